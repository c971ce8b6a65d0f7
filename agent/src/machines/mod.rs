//! The machines netboot serves, from either inventory: a folder of Machine manifests
//! ([`folder`]) or the cluster's Machine resources (`cluster::controller`), both feeding one
//! [`Table`].

pub mod folder;
mod table;

pub use table::Table;
