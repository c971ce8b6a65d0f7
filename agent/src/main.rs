//! `provisioner`: the host agent and its tools.

mod cloud_config_cmd;
mod cloudinit;
mod cluster;
mod config;
mod daemon;
mod dbus;
mod imageserver;
mod logging;
mod machines;
mod pod_network;
mod provisioning;
mod status;
mod systemd;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for bad configuration or usage, distinct from runtime failures (1).
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "provisioner",
    version,
    about = "Network-boot and provision machines into a Kubernetes cluster"
)]
struct Cli {
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
    /// Check a configuration file and print what it means, then exit.
    CheckConfig {
        #[arg(long, short, default_value = "/etc/provisioner/provisioner.yaml")]
        config: PathBuf,
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
    logging::init();
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
        Command::CheckConfig { config } => match config::Config::load(&config) {
            Ok(c) => {
                println!(
                    "{} is valid: server {} on subnet {}",
                    config.display(),
                    c.server_address,
                    c.subnet
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Netboot { config } => {
            let config = match config::Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    // Goes to stderr, or to the journal when started by systemd.
                    tracing::error!("invalid configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(daemon::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("netboot failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Imageserver {
            dir,
            listen,
            bootstrap,
            config,
            upstream,
        } => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let seed = match (bootstrap, config) {
                (None, None) => None,
                (Some(Some(dir)), None) => Some(imageserver::Seed::Dir(dir)),
                (Some(None), Some(config)) => Some(imageserver::Seed::Config(config)),
                (Some(None), None) | (None, Some(_)) => {
                    eprintln!("error: --bootstrap needs a seed directory or --config FILE");
                    return ExitCode::from(EXIT_CONFIG);
                }
                (Some(Some(_)), Some(_)) => {
                    eprintln!("error: --bootstrap takes a seed directory or --config, not both");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let options = imageserver::Options {
                dir,
                listen,
                seed,
                upstream,
            };
            match runtime.block_on(imageserver::run(options)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("imageserver failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::PodNetwork {
            kubeconfig,
            node_name,
            cni_dir,
            bridge,
        } => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let options = pod_network::Options {
                kubeconfig,
                node_name,
                cni_dir,
                bridge,
                resync: std::time::Duration::from_secs(60),
            };
            let result = runtime.block_on(async {
                let shutdown = tokio_util::sync::CancellationToken::new();
                tokio::spawn(cancel_on_signal(shutdown.clone()));
                pod_network::run(options, shutdown).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("pod network failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Cancels `token` on SIGTERM (systemd stopping the unit) or SIGINT.
async fn cancel_on_signal(token: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    token.cancel();
}
