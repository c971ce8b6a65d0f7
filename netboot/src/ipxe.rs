//! ipxe: see module owner.
