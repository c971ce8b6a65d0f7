//! stage2's orders from the kernel command line (the `wire` crate's parser, what netboot's
//! writer puts into the iPXE script). Orders that parse and that the writer accepts again come
//! back unchanged through the writer and the parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::orders::{split_cmdline, split_cmdline_lenient, Orders};

fuzz_target!(|cmdline: &str| {
    let _ = split_cmdline(cmdline);
    let _ = split_cmdline_lenient(cmdline);
    let Ok(orders) = Orders::from_cmdline(cmdline) else {
        return;
    };
    if let Ok(args) = orders.kernel_args() {
        assert_eq!(
            Orders::from_cmdline(&args).as_ref(),
            Ok(&orders),
            "{args:?}"
        );
    }
});
