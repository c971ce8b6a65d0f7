//! The HTTP server: per-machine iPXE scripts, iPXE binaries and boot assets.
//!
//! [`serve`] runs the connection server (accept loop, limits, graceful shutdown, a log line per
//! request) for one [`Site`], which answers each request. netboot's routes are
//! [`NetbootSite`]:
//!
//! | route | answer |
//! |---|---|
//! | `GET /ipxe/{mac}` | the machine's iPXE script (`52-54-00-12-34-56` or `52:54:00:12:34:56`); 400 for a malformed MAC, 404 for a machine we do not know; an imaging script only to the machine's reserved address shortly after its DHCP ACK, else 403 with the reason |
//! | `GET /boot/{file}` | a file from [`HttpSettings::boot_dir`] (iPXE binaries, for UEFI HTTP Boot; a symlink there may resolve to the distribution's iPXE files, [`crate::path::SYSTEM_IPXE_LOADERS`]) |
//! | `GET /assets/{path}` | a file from [`HttpSettings::assets_dir`] (kernel, initrd) |
//! | `POST /report/{mac}` | stage2's [`ProgressReport`] (JSON, at most [`MAX_REPORT_BODY`] bytes) with `Authorization: Bearer {token}`: 204; 400 bad JSON, 401 no token, 403 wrong token or not from the machine's reserved address, 404 unknown machine, 409 wrong phase, 413 too large |
//! | `GET /nocloud/{token}/{meta-data,user-data,vendor-data}` | cloud-init NoCloud files for the holder of the token (NoCloud's `seedfrom` cannot send headers, so the token is in the path); `user-data` is served once per token, a second fetch gets 403, and so does a fetch from another address than the machine's reserved one |
//!
//! The script route asks [`Provisioning::boot_action`] what the machine should boot: stage2
//! with its imaging orders, its local disk, or the configured kernel. Tokens are never logged:
//! `/nocloud/` paths appear in the log as `/nocloud/<token>/user-data`.
//!
//! [`DirSite`] is a plain directory (every path is a file under it, with the same validators,
//! ranges and confinement). A site of another crate (`provisioner imageserver`'s) implements
//! [`Site`] with the same pieces: [`FileRequest`], [`serve_file`], [`is_missing`],
//! [`decode_path`], [`plain`], [`get_or_head`], [`not_allowed`] and [`Body`].
//!
//! `HEAD` is answered like `GET` without a body; any other method gets 405 with `Allow`.
//! Static files carry `Content-Length`, `Last-Modified`, `ETag` and `Accept-Ranges`, honour
//! `If-None-Match`/`If-Modified-Since` (304) and a single `Range` (206, or 416 when no byte of
//! it is in the file, with `If-Range`). A `Range` naming several ranges gets the whole file with
//! 200 rather than a multipart body, which RFC 9110 allows.
//! Directories are never listed (404). Request paths are percent-decoded once; a bad escape,
//! a NUL or control byte, a backslash or a `..` segment is a 400.
//!
//! **Files are sent with `sendfile(2)`.** The server reads each request head itself (httparse,
//! as hyper does); a `GET` or `HEAD` without a body that the site answers with a file
//! ([`Site::static_file`]: netboot's `/boot/` and `/assets/`, every path of a [`DirSite`], the
//! imageserver's files it has) gets its response head written by the server and its body sent
//! by the kernel from the page cache, on the runtime's worker threads: no copy, no blocking
//! thread per chunk, whatever the number of downloads. Every other request (scripts, reports,
//! cloud-init, a cache miss) is handed to hyper with the bytes already read, and the
//! connection comes back after its response, so one keep-alive connection mixes both. The
//! answers, headers, log line and limits are the same on both paths.
//!
//! Connections are bounded by [`HttpLimits`] (see [`limits`]): header, write and total
//! response deadlines, a per-peer and a global connection cap below the file descriptor limit,
//! and small buffers (a request head of at most [`MAX_BUF`], hyper's `max_buf_size` too), so a
//! slow reader of a file holds its head's buffer and an open file; on hyper's path, at most
//! about 200 KiB (hyper's queue, a 64 KiB file chunk, the file's read buffer).
//!
//! Completed asset downloads are not reported as [`BootEvent::FileServed`]: a request for
//! `/assets/vmlinuz` carries nothing that names the machine (the lookup is by MAC only, and the
//! peer's address is not a reliable key), so only the script request is attributed.
//!
//! [`Provisioning::boot_action`]: crate::provisioning::Provisioning::boot_action
//! [`ProgressReport`]: crate::provisioning::ProgressReport
//! [`MAX_REPORT_BODY`]: crate::provisioning::MAX_REPORT_BODY
//! [`BootEvent::FileServed`]: crate::machine::BootEvent::FileServed

mod body;
mod fast;
mod files;
pub mod limits;
mod netboot_site;
mod server;

use std::io;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use body::Body;
pub use files::{
    decode_path, get_or_head, is_missing, not_allowed, parse_range, plain, serve_file, DirSite,
    FileRequest, RangeRequest,
};
/// The request body type a [`Site`] is handed.
pub use hyper::body::Incoming;
pub use limits::{HttpLimits, SHED_AFTER};
pub use netboot_site::{HttpSettings, NetbootSite};
pub use server::{Outcome, ServeOptions, Site, DEFAULT_SHUTDOWN_GRACE, LOG_TARGET, MAX_BUF};

/// Serves `site` on `listener` until `shutdown` is cancelled, then stops accepting, lets
/// in-flight requests finish for up to [`ServeOptions::grace`], and returns `Ok`. Before it
/// listens, the site announces itself and the largest file of its
/// [`Site::largest_file_dir`] is logged with its download deadline.
pub async fn serve<S: Site>(
    listener: TcpListener,
    site: S,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> io::Result<()> {
    site.announce();
    if let Some(dir) = site.largest_file_dir() {
        server::log_largest_file(dir, &options.limits).await;
    }
    server::run(listener, Arc::new(site), options, shutdown).await
}
