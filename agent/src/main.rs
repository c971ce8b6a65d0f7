//! `provisioner`: the host agent and its tools (the command line over the `agent` library).

use agent::{
    check_config, cloud_config_cmd, cluster, config, daemon, imageserver, logging, pod_network,
    preflight, status_cmd,
};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for bad configuration or usage, distinct from runtime failures (1).
const EXIT_CONFIG: u8 = 2;
/// Worker threads at most: the daemons are I/O-bound.
const MAX_WORKER_THREADS: usize = 4;
/// Blocking threads at most (file opens and reads, state-file writes, cache fetches). With
/// the workers this stays well under the units' `TasksMax=` (units/netboot.service).
const MAX_BLOCKING_THREADS: usize = 64;

/// The daemons' runtime, with a bounded number of threads.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(MAX_WORKER_THREADS);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
}

/// Runs `work` to its end on the daemons' runtime. An error, or a runtime that cannot start,
/// exits 1; `report` says what failed.
fn run_to_end(
    work: impl std::future::Future<Output = anyhow::Result<()>>,
    report: impl FnOnce(&anyhow::Error),
) -> ExitCode {
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

#[derive(Parser)]
#[command(
    name = "provisioner",
    version,
    about = "Network-boot and provision machines into a Kubernetes cluster"
)]
struct Cli {
    /// Log level or filter, as RUST_LOG takes it (`debug`, `warn`, `info,netboot=debug`);
    /// overrides RUST_LOG. Default: info.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve DHCP, TFTP and HTTP for the machines of the inventory (the netboot.service daemon).
    Netboot {
        /// Configuration file (see provisioner.yaml.example).
        #[arg(long, short, default_value = "/etc/provisioner/provisioner.yaml")]
        config: PathBuf,
    },
    /// Print the Machine CustomResourceDefinition (YAML, for `kubectl apply -f -`).
    Crd,
    /// Print a rendered cloud-init document: a node's (as netboot serves it) or the first
    /// machine's NoCloud seed (`kubeadm init`, then netboot).
    #[command(subcommand)]
    CloudConfig(cloud_config_cmd::CloudConfig),
    /// Check a configuration offline (its keys, the folders and files it names, every Machine
    /// of the inventory folder and each machine's iPXE script) and print what it means: per
    /// machine, what each firmware is answered. Exit 2 on any error.
    CheckConfig {
        /// Configuration file (see provisioner.yaml.example).
        #[arg(long, short, default_value = "/etc/provisioner/provisioner.yaml")]
        config: PathBuf,
    },
    /// The machines netboot serves, with phase, progress, last seen and message, as netboot
    /// publishes them on D-Bus (dev.provisioner.Netboot1).
    Status {
        /// Print again on every change, until interrupted.
        #[arg(long, short)]
        watch: bool,
    },
    /// Serve the files of a directory (disk images, kernels, initrds) over HTTP with ranges and
    /// validators (the imageserver.service daemon; socket-activated or stand-alone).
    Imageserver {
        /// Directory to serve; only regular files inside it are served.
        #[arg(long)]
        dir: PathBuf,
        /// Address to bind when systemd passed no socket.
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: std::net::SocketAddr,
        /// On the operator's host: also serve the first machine's NoCloud seed,
        /// `/nocloud/NAME/{meta-data,user-data}`, from `SEED_DIR/NAME/` or, with `--config`,
        /// rendered from the configuration's `laptop:` section (NAME is its hostname).
        /// cloud-init: `ds=nocloud-net;s=http://HOST:PORT/nocloud/NAME/`.
        #[arg(long, value_name = "SEED_DIR", num_args = 0..=1)]
        bootstrap: Option<Option<PathBuf>>,
        /// With `--bootstrap`: the configuration file whose `laptop:` section is the seed.
        #[arg(long, short, requires = "bootstrap")]
        config: Option<PathBuf>,
        /// Pull-through cache: fetch a file missing from --dir from this imageserver
        /// (`http://HOST:PORT/`), check it and keep it in --dir.
        #[arg(long, value_name = "URL")]
        upstream: Option<String>,
        #[command(flatten)]
        limits: imageserver::LimitArgs,
    },
    /// On a kubeadm node: the CNI configuration (bridge + host-local) for this node's pod range
    /// and a route to every other node's range (the provisioner-pod-network.service daemon).
    PodNetwork {
        /// Credentials to read Nodes with (the kubelet's).
        #[arg(long, default_value = "/etc/kubernetes/kubelet.conf")]
        kubeconfig: PathBuf,
        /// This node's name; default: the node the credentials belong to (system:node:NAME).
        #[arg(long)]
        node_name: Option<String>,
        /// Directory of CNI configuration files (containerd's conf_dir).
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_dir: PathBuf,
        /// Linux bridge the pods are attached to.
        #[arg(long, default_value = "cni0")]
        bridge: String,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Err(e) = logging::init(cli.log_level.as_deref()) {
        eprintln!("error: --log-level: {e:#}");
        return ExitCode::from(EXIT_CONFIG);
    }
    run(cli.command)
}

fn run(command: Command) -> ExitCode {
    match command {
        Command::Crd => match cluster::crd::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot serialise the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::CloudConfig(which) => match cloud_config_cmd::render(which) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::CheckConfig { config } => {
            let report = check_config::check(&config);
            for warning in &report.warnings {
                eprintln!("warning: {warning}");
            }
            for error in &report.errors {
                eprintln!("error: {error}");
            }
            if report.errors.is_empty() {
                println!("{} is valid", config.display());
                print!("{}", report.meaning);
                ExitCode::SUCCESS
            } else {
                eprintln!("{}: {} error(s)", config.display(), report.errors.len());
                ExitCode::from(EXIT_CONFIG)
            }
        }
        Command::Status { watch } => {
            run_to_end(status_cmd::run(watch), |e| eprintln!("error: {e:#}"))
        }
        Command::Netboot { config: path } => {
            let config = match config::Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    // Goes to stderr, or to the journal when started by systemd.
                    tracing::error!("invalid configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            // What check-config says of the files and folders, before anything is served.
            let findings = preflight::check(&config);
            for finding in findings.iter().filter(|f| !f.error) {
                tracing::warn!("{}", finding.to_config_error(&path));
            }
            let errors: Vec<_> = findings.iter().filter(|f| f.error).collect();
            if !errors.is_empty() {
                for finding in errors {
                    tracing::error!("invalid configuration: {}", finding.to_config_error(&path));
                }
                return ExitCode::from(EXIT_CONFIG);
            }
            run_to_end(daemon::run(config), |e| {
                tracing::error!("netboot failed: {e:#}");
            })
        }
        Command::Imageserver {
            dir,
            listen,
            bootstrap,
            config,
            upstream,
            limits,
        } => {
            let seed = match (bootstrap, config) {
                (None, None) => None,
                (Some(Some(dir)), None) => Some(imageserver::Seed::Dir(dir)),
                (Some(None), Some(config)) => Some(imageserver::Seed::Config(config)),
                (Some(None), None) | (None, Some(_)) => {
                    tracing::error!("--bootstrap needs a seed directory or --config FILE");
                    return ExitCode::from(EXIT_CONFIG);
                }
                (Some(Some(_)), Some(_)) => {
                    tracing::error!("--bootstrap takes a seed directory or --config, not both");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let options = imageserver::Options {
                dir,
                listen,
                seed,
                upstream,
                limits: limits.into(),
            };
            // Bad flags are usage errors, as netboot's bad configuration is: exit 2 before
            // anything is served.
            if let Err(e) = options.check() {
                tracing::error!("invalid options: {e:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
            run_to_end(imageserver::run(options), |e| {
                tracing::error!("imageserver failed: {e:#}");
            })
        }
        Command::PodNetwork {
            kubeconfig,
            node_name,
            cni_dir,
            bridge,
        } => {
            let options = pod_network::Options {
                kubeconfig,
                node_name,
                cni_dir,
                bridge,
                resync: std::time::Duration::from_secs(60),
            };
            let work = async {
                let shutdown = tokio_util::sync::CancellationToken::new();
                tokio::spawn(agent::cancel_on_signal(shutdown.clone()));
                pod_network::run(options, shutdown).await
            };
            run_to_end(work, |e| tracing::error!("pod network failed: {e:#}"))
        }
    }
}
