//! Kernel module index: `modules.dep`, `modules.alias`, `modules.softdep`, `modules.builtin` and
//! `modules.builtin.modinfo` of one kernel, and what to load for a device's modalias, in
//! dependency order.
//!
//! A module built into the kernel (`modules.builtin`, e.g. virtio on Debian's 6.12) counts as
//! present: it needs no file and nothing loads it, and modules that depend on it are satisfied.
//!
//! Used twice: on the build host to pick the modules an initrd carries (and their dependencies),
//! and in the initrd by PID 1 to load what the hardware needs (see [`ModuleLoader`]), since there
//! is no `modprobe` in the initrd.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Modules every stage2 initrd carries, whatever the hardware: NICs, disk controllers and the
/// file systems of the image's root and EFI partitions. Their dependencies (hard and soft) are
/// added by [`ModuleDb::closure`].
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    "e1000",
    "e1000e",
    "igb",
    "ixgbe",
    "mlx5_core",
    "ahci",
    "nvme",
    "sd_mod",
    "ext4",
    "vfat",
    // vfat mounts ask the kernel for these code pages by request_module(), which needs modprobe:
    // the initrd has none, so they are carried and loaded up front.
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
    "nls_iso8859_1",
];

/// Modules PID 1 loads whatever devices it finds: the file systems it mounts after imaging
/// (ext4 for the root, vfat for the EFI partition) and the code pages vfat asks for.
pub const ALWAYS_LOAD: &[&str] = &["ext4", "vfat", "nls_cp437", "nls_ascii", "nls_utf8"];

#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("{file} line {line}: {reason}")]
    Parse {
        file: &'static str,
        line: usize,
        reason: String,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no module or alias named {0:?} in modules.dep/modules.alias/modules.builtin")]
    Unknown(String),
    #[error("loading module {module} from {path}: {source}")]
    Load {
        module: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One module of `modules.dep`: its file (relative to `/lib/modules/VERSION`) and hard
/// dependencies (module names, as depmod lists them: the last one must be loaded first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    pub path: String,
    pub deps: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SoftDeps {
    /// Names or aliases to load before the module.
    pub pre: Vec<String>,
    /// Names or aliases to load after the module.
    pub post: Vec<String>,
}

/// A parsed module index of one kernel.
#[derive(Debug, Clone, Default)]
pub struct ModuleDb {
    modules: BTreeMap<String, ModuleEntry>,
    aliases: Vec<Alias>,
    softdeps: BTreeMap<String, SoftDeps>,
    /// Modules built into the kernel, by name, with their path as `modules.builtin` lists it.
    builtin: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct Alias {
    pattern: glob::Pattern,
    /// The line's text, kept to write a filtered `modules.alias`.
    pattern_text: String,
    module: String,
}

/// Module name as the kernel knows it: file name without `.ko[.xz|.zst|.gz]`, `-` as `_`.
pub fn module_name(path_or_name: &str) -> String {
    let base = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let base = base
        .strip_suffix(".xz")
        .or_else(|| base.strip_suffix(".zst"))
        .or_else(|| base.strip_suffix(".gz"))
        .unwrap_or(base);
    let base = base.strip_suffix(".ko").unwrap_or(base);
    base.replace('-', "_")
}

/// How a module file is compressed, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleCompression {
    None,
    Xz,
    Zstd,
    Gzip,
}

impl ModuleCompression {
    pub fn of(path: &str) -> Self {
        if path.ends_with(".ko.xz") {
            Self::Xz
        } else if path.ends_with(".ko.zst") {
            Self::Zstd
        } else if path.ends_with(".ko.gz") {
            Self::Gzip
        } else {
            Self::None
        }
    }
}

/// The path of a module once stored uncompressed (`foo.ko.xz` → `foo.ko`).
pub fn uncompressed_path(path: &str) -> String {
    match ModuleCompression::of(path) {
        ModuleCompression::None => path.to_string(),
        _ => path
            .rsplit_once('.')
            .map(|(stem, _)| stem.to_string())
            .unwrap_or_else(|| path.to_string()),
    }
}

impl ModuleDb {
    /// Parses the three text files depmod writes. `softdep` may be empty.
    pub fn parse(dep: &str, alias: &str, softdep: &str) -> Result<Self, ModulesError> {
        let mut db = ModuleDb::default();
        for (index, line) in dep.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (path, deps) = line.split_once(':').ok_or_else(|| ModulesError::Parse {
                file: "modules.dep",
                line: index + 1,
                reason: "no ':' after the module path".into(),
            })?;
            let path = path.trim();
            if path.is_empty() {
                return Err(ModulesError::Parse {
                    file: "modules.dep",
                    line: index + 1,
                    reason: "empty module path".into(),
                });
            }
            let deps = deps.split_whitespace().map(module_name).collect();
            db.modules.insert(
                module_name(path),
                ModuleEntry {
                    path: path.to_string(),
                    deps,
                },
            );
        }
        for (index, line) in alias.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some("alias"), Some(pattern_text), Some(module), None) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                return Err(ModulesError::Parse {
                    file: "modules.alias",
                    line: index + 1,
                    reason: "expected 'alias PATTERN MODULE'".into(),
                });
            };
            // modules.alias holds fnmatch(3) patterns (`*`, `?`, `[...]`), which glob::Pattern
            // implements; a pattern it rejects is skipped rather than failing the whole index.
            let Ok(pattern) = glob::Pattern::new(pattern_text) else {
                tracing::warn!(
                    line = index + 1,
                    pattern = pattern_text,
                    "unusable alias pattern"
                );
                continue;
            };
            db.aliases.push(Alias {
                pattern,
                pattern_text: pattern_text.to_string(),
                module: module_name(module),
            });
        }
        for (index, line) in softdep.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some("softdep"), Some(module)) = (words.next(), words.next()) else {
                return Err(ModulesError::Parse {
                    file: "modules.softdep",
                    line: index + 1,
                    reason: "expected 'softdep MODULE pre: ... post: ...'".into(),
                });
            };
            let entry = db.softdeps.entry(module_name(module)).or_default();
            // Words before any "pre:"/"post:" are pre-dependencies, as modprobe reads them.
            let mut post = false;
            for word in words {
                match word {
                    "pre:" => post = false,
                    "post:" => post = true,
                    name if post => entry.post.push(name.to_string()),
                    name => entry.pre.push(name.to_string()),
                }
            }
        }
        Ok(db)
    }

    /// Adds the modules built into the kernel: `modules.builtin` (one path per line, as in
    /// `modules.dep`) and the aliases of `modules.builtin.modinfo` (NUL-terminated
    /// `MODULE.KEY=VALUE` records; only `alias` records are used, other keys are skipped). Both
    /// may be empty.
    pub fn with_builtin(mut self, builtin: &str, modinfo: &[u8]) -> Result<Self, ModulesError> {
        for line in builtin.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            self.builtin.insert(module_name(line), line.to_string());
        }
        for (index, record) in modinfo.split(|b| *b == 0).enumerate() {
            if record.is_empty() {
                continue;
            }
            let malformed = |reason: &str| ModulesError::Parse {
                file: "modules.builtin.modinfo",
                line: index + 1,
                reason: reason.to_string(),
            };
            // Descriptions and parameter texts need not be UTF-8; only alias records must be.
            let Some(eq) = record.iter().position(|b| *b == b'=') else {
                return Err(malformed("expected 'MODULE.KEY=VALUE'"));
            };
            let (name_key, value) = (&record[..eq], &record[eq + 1..]);
            if name_key != b"alias" && !name_key.ends_with(b".alias") {
                continue;
            }
            let (Ok(name_key), Ok(pattern_text)) =
                (std::str::from_utf8(name_key), std::str::from_utf8(value))
            else {
                return Err(malformed("alias record is not UTF-8"));
            };
            let Some(module) = name_key.strip_suffix(".alias").filter(|m| !m.is_empty()) else {
                return Err(malformed("alias record without a module name"));
            };
            let Ok(pattern) = glob::Pattern::new(pattern_text) else {
                tracing::warn!(
                    record = index + 1,
                    pattern = pattern_text,
                    "unusable built-in alias pattern"
                );
                continue;
            };
            let module = module_name(module);
            if !self.builtin.contains_key(&module) {
                // modinfo also covers code that is not a module at all (e.g. `printk`); only
                // what modules.builtin lists is a module someone may ask for.
                continue;
            }
            self.aliases.push(Alias {
                pattern,
                pattern_text: pattern_text.to_string(),
                module,
            });
        }
        Ok(self)
    }

    /// Reads `modules.dep`, `modules.alias` and, if present, `modules.softdep`,
    /// `modules.builtin` and `modules.builtin.modinfo` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, ModulesError> {
        let read = |name: &str, required: bool| -> Result<Vec<u8>, ModulesError> {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(bytes),
                Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
                Err(source) => Err(ModulesError::Read { path, source }),
            }
        };
        let read_text = |name: &str, required: bool| -> Result<String, ModulesError> {
            String::from_utf8(read(name, required)?).map_err(|e| ModulesError::Read {
                path: dir.join(name),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })
        };
        Self::parse(
            &read_text("modules.dep", true)?,
            &read_text("modules.alias", true)?,
            &read_text("modules.softdep", false)?,
        )?
        .with_builtin(
            &read_text("modules.builtin", false)?,
            &read("modules.builtin.modinfo", false)?,
        )
    }

    pub fn module(&self, name: &str) -> Option<&ModuleEntry> {
        self.modules.get(&module_name(name))
    }

    pub fn module_count(&self) -> usize {
        self.modules.len()
    }

    /// Whether the kernel has this module built in (by name, `-` or `_`).
    pub fn is_builtin(&self, name: &str) -> bool {
        let name = module_name(name);
        self.builtin.contains_key(&name) && !self.modules.contains_key(&name)
    }

    pub fn builtin_count(&self) -> usize {
        self.builtin.len()
    }

    /// Modules whose alias patterns match a device's modalias (sorted, no duplicates).
    pub fn match_modalias(&self, modalias: &str) -> Vec<String> {
        let found: BTreeSet<&str> = self
            .aliases
            .iter()
            .filter(|alias| alias.pattern.matches(modalias))
            .map(|alias| alias.module.as_str())
            .collect();
        found.into_iter().map(str::to_string).collect()
    }

    /// A module name (loadable or built in), or else every module an alias names (e.g.
    /// `crypto-crc32c`).
    pub fn resolve(&self, name_or_alias: &str) -> Vec<String> {
        let name = module_name(name_or_alias);
        if self.modules.contains_key(&name) || self.builtin.contains_key(&name) {
            return vec![name];
        }
        self.match_modalias(name_or_alias)
    }

    /// Modules to load, in order, so that `roots` are loaded with every dependency before them:
    /// soft pre-dependencies, then hard dependencies (deepest first), the module itself, then
    /// soft post-dependencies. Each module appears once; built-in ones are left out (see
    /// [`Self::load_plan`]). A root that names no module fails; a soft dependency that resolves
    /// to nothing is skipped (it is optional by definition).
    pub fn load_order(&self, roots: &[String]) -> Result<Vec<String>, ModulesError> {
        Ok(self
            .load_plan(roots)?
            .into_iter()
            .filter(|m| !m.builtin)
            .map(|m| m.name)
            .collect())
    }

    /// [`Self::load_order`], telling which modules are only wanted as soft dependencies (or as
    /// one of several providers of an alias, like crc32c_intel for `crypto-crc32c`): those may
    /// fail to load (no such CPU feature or device) without anything being wrong. Built-in
    /// modules are listed too, marked [`PlannedModule::builtin`]: they are present from boot,
    /// so neither they nor their soft dependencies are loaded (as modprobe skips a module
    /// already in the kernel).
    pub fn load_plan(&self, roots: &[String]) -> Result<Vec<PlannedModule>, ModulesError> {
        let mut order: Vec<PlannedModule> = Vec::new();
        let mut seen = HashSet::new();
        for root in roots {
            let resolved = self.resolve(root);
            if resolved.is_empty() {
                return Err(ModulesError::Unknown(root.clone()));
            }
            let optional = resolved.len() > 1;
            for module in resolved {
                self.visit(&module, optional, &mut seen, &mut order);
            }
        }
        Ok(order)
    }

    fn visit(
        &self,
        module: &str,
        optional: bool,
        seen: &mut HashSet<String>,
        order: &mut Vec<PlannedModule>,
    ) {
        if !seen.insert(module.to_string()) {
            if !optional {
                // Needed after all (e.g. a soft dependency of one module, a hard one of another).
                if let Some(planned) = order.iter_mut().find(|m| m.name == module) {
                    planned.optional = false;
                }
            }
            return;
        }
        if self.is_builtin(module) {
            order.push(PlannedModule {
                name: module.to_string(),
                optional,
                builtin: true,
            });
            return;
        }
        let soft = self.softdeps.get(module);
        for pre in soft.map(|s| s.pre.as_slice()).unwrap_or_default() {
            for dep in self.resolve(pre) {
                self.visit(&dep, true, seen, order);
            }
        }
        if let Some(entry) = self.modules.get(module) {
            // depmod lists dependencies so that the last must be loaded first (as modprobe does).
            for dep in entry.deps.iter().rev() {
                self.visit(dep, optional, seen, order);
            }
        }
        order.push(PlannedModule {
            name: module.to_string(),
            optional,
            builtin: false,
        });
        for post in soft.map(|s| s.post.as_slice()).unwrap_or_default() {
            for dep in self.resolve(post) {
                self.visit(&dep, true, seen, order);
            }
        }
    }

    /// Every loadable module `roots` need (see [`Self::load_order`]), as a sorted set: what an
    /// initrd carries.
    pub fn closure(&self, roots: &[String]) -> Result<BTreeSet<String>, ModulesError> {
        Ok(self.load_order(roots)?.into_iter().collect())
    }

    /// The built-in modules `roots` name or need: present in the kernel, so not carried.
    pub fn builtin_needed(&self, roots: &[String]) -> Result<BTreeSet<String>, ModulesError> {
        Ok(self
            .load_plan(roots)?
            .into_iter()
            .filter(|m| m.builtin)
            .map(|m| m.name)
            .collect())
    }

    /// `modules.dep` for a subset of modules (which must be closed under dependencies), with the
    /// module paths mapped by `path_of` (e.g. to drop a compression suffix).
    pub fn render_dep(&self, keep: &BTreeSet<String>, path_of: impl Fn(&str) -> String) -> String {
        let mut out = String::new();
        for (name, entry) in &self.modules {
            if !keep.contains(name) {
                continue;
            }
            out.push_str(&path_of(&entry.path));
            out.push(':');
            for dep in &entry.deps {
                if let Some(dep_entry) = self.modules.get(dep) {
                    out.push(' ');
                    out.push_str(&path_of(&dep_entry.path));
                }
            }
            out.push('\n');
        }
        out
    }

    /// `modules.alias` lines of the modules in `keep`, in their original order.
    pub fn render_alias(&self, keep: &BTreeSet<String>) -> String {
        let mut out = String::new();
        for alias in self
            .aliases
            .iter()
            .filter(|a| keep.contains(&a.module) && !self.is_builtin(&a.module))
        {
            out.push_str(&format!("alias {} {}\n", alias.pattern_text, alias.module));
        }
        out
    }

    /// `modules.softdep` lines of the modules in `keep`.
    pub fn render_softdep(&self, keep: &BTreeSet<String>) -> String {
        let mut out = String::new();
        for (module, soft) in self.softdeps.iter().filter(|(m, _)| keep.contains(*m)) {
            out.push_str("softdep ");
            out.push_str(module);
            if !soft.pre.is_empty() {
                out.push_str(" pre: ");
                out.push_str(&soft.pre.join(" "));
            }
            if !soft.post.is_empty() {
                out.push_str(" post: ");
                out.push_str(&soft.post.join(" "));
            }
            out.push('\n');
        }
        out
    }

    /// `modules.builtin`: every built-in module's path, sorted by name. The whole list is kept
    /// (a few KiB): PID 1 must know any built-in module a device or the kernel may ask for.
    pub fn render_builtin(&self) -> String {
        let mut out = String::new();
        for path in self.builtin.values() {
            out.push_str(path);
            out.push('\n');
        }
        out
    }

    /// `modules.builtin.modinfo` reduced to the alias records of built-in modules (the only
    /// records this index reads), in their original order.
    pub fn render_builtin_modinfo(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for alias in self.aliases.iter().filter(|a| self.is_builtin(&a.module)) {
            out.extend_from_slice(alias.module.as_bytes());
            out.extend_from_slice(b".alias=");
            out.extend_from_slice(alias.pattern_text.as_bytes());
            out.push(0);
        }
        out
    }
}

/// One step of a [`ModuleDb::load_plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedModule {
    pub name: String,
    /// Only a soft dependency, or one of several modules an alias names: failing is normal.
    pub optional: bool,
    /// Built into the kernel: present already, nothing to load.
    pub builtin: bool,
}

/// What happened to one module a [`ModuleLoader`] tried to load.
#[derive(Debug)]
pub struct LoadReport {
    pub module: String,
    pub optional: bool,
    pub outcome: Result<LoadOutcome, ModulesError>,
}

/// What happened to one module a [`ModuleLoader`] was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadOutcome {
    Loaded,
    /// Loaded before (by us or by the kernel).
    AlreadyPresent,
    /// Built into the kernel (`modules.builtin`): nothing was loaded.
    BuiltIn,
}

/// How a module file gets into the kernel: `finit_module(2)` unless a test says otherwise.
pub type InsertModule = Box<dyn FnMut(&Path, &File) -> Result<(), nix::errno::Errno>>;

fn finit_module(_path: &Path, file: &File) -> Result<(), nix::errno::Errno> {
    nix::kmod::finit_module(file, c"", nix::kmod::ModuleInitFlags::empty())
}

/// Loads modules with `finit_module(2)` from `/lib/modules/VERSION` (in the initrd), each after
/// its dependencies, remembering what it has loaded. Built-in modules are reported as such and
/// never loaded.
pub struct ModuleLoader {
    db: ModuleDb,
    dir: PathBuf,
    /// `/sys/module`: a module present there with an `initstate` is loaded already.
    sys_module: PathBuf,
    insert: InsertModule,
    done: HashSet<String>,
}

impl ModuleLoader {
    pub fn new(db: ModuleDb, dir: PathBuf) -> Self {
        Self {
            db,
            dir,
            sys_module: PathBuf::from("/sys/module"),
            insert: Box::new(finit_module),
            done: HashSet::new(),
        }
    }

    /// A loader that looks for loaded modules in `sys_module` and inserts them with `insert`:
    /// lets tests on the host see what PID 1 would load, without touching the host's kernel.
    pub fn with_kernel(mut self, sys_module: PathBuf, insert: InsertModule) -> Self {
        self.sys_module = sys_module;
        self.insert = insert;
        self
    }

    pub fn db(&self) -> &ModuleDb {
        &self.db
    }

    /// Loads `roots` and their dependencies. Every module is attempted; the result lists each
    /// attempted module with its outcome or error (a device whose driver fails to probe, such as
    /// crc32c_intel on a CPU without SSE4.2, must not stop the others).
    pub fn load(&mut self, roots: &[String]) -> Result<Vec<LoadReport>, ModulesError> {
        let plan = self.db.load_plan(roots)?;
        let mut results = Vec::new();
        for PlannedModule {
            name,
            optional,
            builtin,
        } in plan
        {
            if self.done.contains(&name) {
                continue;
            }
            let outcome = if builtin {
                Ok(LoadOutcome::BuiltIn)
            } else {
                self.load_one(&name)
            };
            // Tried once: an optional module that failed (no such CPU feature) is not retried.
            self.done.insert(name.clone());
            results.push(LoadReport {
                module: name,
                optional,
                outcome,
            });
        }
        Ok(results)
    }

    fn load_one(&mut self, module: &str) -> Result<LoadOutcome, ModulesError> {
        if self.sys_module.join(module).join("initstate").exists() {
            return Ok(LoadOutcome::AlreadyPresent);
        }
        let Some(entry) = self.db.module(module) else {
            // Not in modules.dep: an index without modules.builtin, where a built-in module is
            // only known by its absence; nothing to load.
            return Ok(LoadOutcome::AlreadyPresent);
        };
        let path = self.dir.join(&entry.path);
        let load_error = |source| ModulesError::Load {
            module: module.to_string(),
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(load_error)?;
        match (self.insert)(&path, &file) {
            Ok(()) => Ok(LoadOutcome::Loaded),
            Err(nix::errno::Errno::EEXIST) => Ok(LoadOutcome::AlreadyPresent),
            Err(errno) => Err(load_error(std::io::Error::from(errno))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = include_str!("../tests/fixtures/modules/modules.dep");
    const ALIAS: &str = include_str!("../tests/fixtures/modules/modules.alias");
    const SOFTDEP: &str = include_str!("../tests/fixtures/modules/modules.softdep");

    fn db() -> ModuleDb {
        match ModuleDb::parse(DEP, ALIAS, SOFTDEP) {
            Ok(db) => db,
            Err(e) => panic!("fixture does not parse: {e}"),
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn position(order: &[String], module: &str) -> usize {
        order
            .iter()
            .position(|m| m == module)
            .unwrap_or_else(|| panic!("{module} missing from {order:?}"))
    }

    #[test]
    fn module_names_drop_suffix_and_dashes() {
        assert_eq!(
            module_name("kernel/drivers/nvme/host/nvme-core.ko"),
            "nvme_core"
        );
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko.xz"), "ext4");
        assert_eq!(
            module_name("kernel/lib/crc64-rocksoft.ko.zst"),
            "crc64_rocksoft"
        );
        assert_eq!(module_name("crypto-crc32c"), "crypto_crc32c");
        assert_eq!(uncompressed_path("a/b.ko.zst"), "a/b.ko");
        assert_eq!(uncompressed_path("a/b.ko"), "a/b.ko");
    }

    #[test]
    fn virtio_pci_device_matches_virtio_pci_and_virtio_net_device_matches_virtio_net() {
        let db = db();
        // A virtio network device as QEMU presents it on the PCI bus, then on the virtio bus.
        assert_eq!(
            db.match_modalias("pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00"),
            names(&["virtio_pci"])
        );
        assert_eq!(
            db.match_modalias("virtio:d00000001v00001AF4"),
            names(&["virtio_net"])
        );
        assert_eq!(
            db.match_modalias("virtio:d00000002v00001AF4"),
            names(&["virtio_blk"])
        );
        // An Intel 82540EM (QEMU's e1000) and an AHCI controller matched by class only.
        assert_eq!(
            db.match_modalias("pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00"),
            names(&["e1000"])
        );
        assert_eq!(
            db.match_modalias("pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01"),
            names(&["ahci"])
        );
        assert!(db
            .match_modalias("pci:v00001234d00001111sv00001AF4sd00001100bc03sc00i00")
            .is_empty());
    }

    #[test]
    fn bracket_patterns_match_like_fnmatch() {
        let db = db();
        // "alias test:x[ab]y[!0-4]* bracket_test" (fnmatch classes, negated with '!')
        assert_eq!(db.match_modalias("test:xay9"), names(&["bracket_test"]));
        assert_eq!(db.match_modalias("test:xby5rest"), names(&["bracket_test"]));
        assert!(db.match_modalias("test:xcy9").is_empty());
        assert!(db.match_modalias("test:xay3").is_empty());
        // literal characters and '*' across the whole string
        assert_eq!(db.match_modalias("scsi:t-0x00"), names(&["sd_mod"]));
        assert!(db.match_modalias("scsi:t-0x01").is_empty());
    }

    #[test]
    fn dependencies_come_before_their_users_deepest_first() {
        let db = db();
        let order = match db.load_order(&names(&["virtio_net", "ext4"])) {
            Ok(order) => order,
            Err(e) => panic!("{e}"),
        };
        for (before, after) in [
            ("virtio_ring", "virtio"),
            ("virtio", "virtio_net"),
            ("failover", "net_failover"),
            ("net_failover", "virtio_net"),
            ("crc16", "ext4"),
            ("mbcache", "ext4"),
            ("jbd2", "ext4"),
            // softdep ext4 pre: crypto-crc32c (an alias of crc32c_generic)
            ("crc32c_generic", "ext4"),
        ] {
            assert!(
                position(&order, before) < position(&order, after),
                "{before} must load before {after}: {order:?}"
            );
        }
        let unique: HashSet<&String> = order.iter().collect();
        assert_eq!(unique.len(), order.len(), "duplicates in {order:?}");
    }

    #[test]
    fn soft_dependencies_are_optional_unless_also_needed_hard() {
        let db = db();
        let plan = match db.load_plan(&names(&["ext4", "crc16", "nvme"])) {
            Ok(plan) => plan,
            Err(e) => panic!("{e}"),
        };
        let optional = |name: &str| {
            plan.iter()
                .find(|m| m.name == name)
                .map(|m| m.optional)
                .unwrap_or_else(|| panic!("{name} not planned: {plan:?}"))
        };
        assert!(optional("crc32c_generic"), "softdep of ext4");
        assert!(!optional("ext4"));
        assert!(!optional("crc16"), "hard dependency of ext4 and a root");
        assert!(!optional("jbd2"));
        // softdep crc64_rocksoft pre: crc64, but crc64 is also a hard dependency of t10_pi
        assert!(!optional("crc64"));
    }

    #[test]
    fn aliases_resolve_to_modules_and_unknown_names_fail() {
        let db = db();
        assert_eq!(db.resolve("crypto-crc32c"), names(&["crc32c_generic"]));
        assert_eq!(db.resolve("nvme-core"), names(&["nvme_core"]));
        assert!(matches!(
            db.load_order(&names(&["no_such_driver"])),
            Err(ModulesError::Unknown(name)) if name == "no_such_driver"
        ));
    }

    #[test]
    fn closure_includes_soft_and_hard_dependencies() {
        let db = db();
        let closure = match db.closure(&names(&["ext4", "nvme"])) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let expected: BTreeSet<String> = [
            "crc16",
            "crc32c_generic",
            "crc64",
            "crc64_rocksoft",
            "crc_t10dif",
            "crct10dif_common",
            "ext4",
            "jbd2",
            "mbcache",
            "nvme",
            "nvme_core",
            "t10_pi",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(closure, expected);
    }

    #[test]
    fn rendered_subset_parses_back_with_the_same_answers() {
        let db = db();
        let keep = match db.closure(&names(&["virtio_net", "virtio_pci", "ext4"])) {
            Ok(k) => k,
            Err(e) => panic!("{e}"),
        };
        let dep = db.render_dep(&keep, uncompressed_path);
        let alias = db.render_alias(&keep);
        let softdep = db.render_softdep(&keep);
        assert!(!dep.contains("nvme"), "{dep}");
        assert!(!alias.contains("e1000"), "{alias}");
        assert!(
            softdep.contains("softdep ext4 pre: crypto-crc32c"),
            "{softdep}"
        );
        let subset = match ModuleDb::parse(&dep, &alias, &softdep) {
            Ok(db) => db,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(subset.module_count(), keep.len());
        assert_eq!(
            subset.load_order(&names(&["ext4"])).ok(),
            db.load_order(&names(&["ext4"])).ok()
        );
        assert_eq!(
            subset.match_modalias("virtio:d00000001v00001AF4"),
            names(&["virtio_net"])
        );
    }

    mod builtin {
        use super::*;

        const DIR: &str = "../tests/fixtures/modules-virtio-builtin";
        const DEP: &str = include_str!("../tests/fixtures/modules-virtio-builtin/modules.dep");
        const ALIAS: &str = include_str!("../tests/fixtures/modules-virtio-builtin/modules.alias");
        const SOFTDEP: &str =
            include_str!("../tests/fixtures/modules-virtio-builtin/modules.softdep");
        const BUILTIN: &str =
            include_str!("../tests/fixtures/modules-virtio-builtin/modules.builtin");
        const MODINFO: &[u8] =
            include_bytes!("../tests/fixtures/modules-virtio-builtin/modules.builtin.modinfo");

        fn db() -> ModuleDb {
            match ModuleDb::parse(DEP, ALIAS, SOFTDEP)
                .and_then(|db| db.with_builtin(BUILTIN, MODINFO))
            {
                Ok(db) => db,
                Err(e) => panic!("{DIR} does not parse: {e}"),
            }
        }

        fn plan(db: &ModuleDb, roots: &[&str]) -> Vec<PlannedModule> {
            db.load_plan(&names(roots))
                .unwrap_or_else(|e| panic!("{roots:?}: {e}"))
        }

        #[test]
        fn builtin_modules_are_known_by_name_and_modinfo_alias() {
            let db = db();
            assert_eq!(db.builtin_count(), 12);
            assert!(db.is_builtin("virtio_pci"));
            assert!(db.is_builtin("rtc-cmos"), "file name with '-'");
            assert!(!db.is_builtin("virtio_scsi"), "a loadable module");
            assert!(
                !db.is_builtin("printk"),
                "modinfo of code that is no module"
            );
            assert_eq!(db.resolve("virtio_pci"), names(&["virtio_pci"]));
            assert_eq!(db.match_modalias("platform:rtc_cmos"), names(&["rtc_cmos"]));
            // Two providers: the built-in generic one and the loadable crc32c_intel.
            assert_eq!(
                db.resolve("crypto-crc32c"),
                names(&["crc32c_generic", "crc32c_intel"])
            );
            // The device-table aliases of built-in drivers are not in modinfo: no match.
            assert!(db
                .match_modalias("pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00")
                .is_empty());
        }

        #[test]
        fn a_builtin_root_is_planned_as_builtin_and_nothing_else() {
            let db = db();
            assert_eq!(
                plan(&db, &["virtio_pci", "virtio_net"]),
                vec![
                    PlannedModule {
                        name: "virtio_pci".into(),
                        optional: false,
                        builtin: true
                    },
                    PlannedModule {
                        name: "virtio_net".into(),
                        optional: false,
                        builtin: true
                    },
                ]
            );
            assert_eq!(db.load_order(&names(&["virtio_pci"])).ok(), Some(vec![]));
            assert!(matches!(
                db.load_order(&names(&["virtio_gpu"])),
                Err(ModulesError::Unknown(name)) if name == "virtio_gpu"
            ));
        }

        #[test]
        fn builtin_soft_dependencies_are_satisfied_and_not_carried() {
            let db = db();
            let order = db
                .load_order(&names(&["ext4"]))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                order,
                names(&["crc32c_intel", "jbd2", "mbcache", "crc16", "ext4"])
            );
            let builtin = db
                .builtin_needed(&names(&["ext4", "virtio_scsi"]))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(builtin, BTreeSet::from(["crc32c_generic".to_string()]));
        }

        #[test]
        fn softdeps_of_a_builtin_module_are_not_followed() {
            // As modprobe does for a module already in the kernel.
            let db = ModuleDb::parse(
                "kernel/lib/crc16.ko:\n",
                "",
                "softdep virtio_net pre: crc16\n",
            )
            .and_then(|db| db.with_builtin("kernel/drivers/net/virtio_net.ko\n", b""))
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(db.load_order(&names(&["virtio_net"])).ok(), Some(vec![]));
        }

        #[test]
        fn rendered_builtin_files_parse_back_with_the_same_answers() {
            let db = db();
            let rendered = ModuleDb::parse("", "", "")
                .and_then(|empty| {
                    empty.with_builtin(&db.render_builtin(), &db.render_builtin_modinfo())
                })
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(rendered.builtin_count(), db.builtin_count());
            assert!(rendered.is_builtin("rtc_cmos"));
            assert_eq!(
                rendered.match_modalias("platform:rtc_cmos"),
                names(&["rtc_cmos"])
            );
            assert_eq!(rendered.resolve("crc32c"), names(&["crc32c_generic"]));
            // Only alias records are kept, and no loadable module's alias is mixed in.
            let modinfo =
                String::from_utf8(db.render_builtin_modinfo()).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(modinfo.matches('\0').count(), 5, "{modinfo:?}");
            assert!(!modinfo.contains("license") && !modinfo.contains("crc32c_intel"));
            // The loadable modules' alias file does not list built-in ones.
            let keep = db
                .closure(&names(&["ext4"]))
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(!db.render_alias(&keep).contains("crc32c_generic"));
        }

        #[test]
        fn modinfo_records_other_than_aliases_may_be_anything_but_aliases_must_be_well_formed() {
            let with = |modinfo: &[u8]| {
                ModuleDb::default().with_builtin("kernel/drivers/rtc/rtc-cmos.ko\n", modinfo)
            };
            let db =
                with(b"rtc_cmos.description=\xff\xfe not UTF-8\0rtc_cmos.alias=platform:rtc\0")
                    .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(db.match_modalias("platform:rtc"), names(&["rtc_cmos"]));
            assert!(matches!(
                with(b"rtc_cmos.license=GPL\0no equals sign\0"),
                Err(ModulesError::Parse {
                    file: "modules.builtin.modinfo",
                    line: 2,
                    ..
                })
            ));
            assert!(matches!(
                with(b".alias=platform:rtc\0"),
                Err(ModulesError::Parse { line: 1, .. })
            ));
        }
    }

    #[test]
    fn malformed_lines_are_reported_with_their_number() {
        let err = ModuleDb::parse("kernel/a.ko:\nbroken line\n", "", "");
        assert!(
            matches!(
                err,
                Err(ModulesError::Parse {
                    file: "modules.dep",
                    line: 2,
                    ..
                })
            ),
            "{err:?}"
        );
        let err = ModuleDb::parse("", "alias only-two-words\n", "");
        assert!(
            matches!(
                err,
                Err(ModulesError::Parse {
                    file: "modules.alias",
                    line: 1,
                    ..
                })
            ),
            "{err:?}"
        );
    }
}
