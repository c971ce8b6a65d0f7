//! dhcp: see module owner.
