//! tftp: see module owner.
