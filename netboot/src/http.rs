//! http: see module owner.
