//! Installing the Machine CRD on start (server-side apply), when the configuration allows it.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, CustomResourceExt};

use super::controller::FIELD_MANAGER;
use super::crd::Machine;

/// `machines.provisioner.dev`.
pub fn crd_name() -> String {
    Machine::crd().metadata.name.unwrap_or_default()
}

/// How the CRD step went.
#[derive(Debug, PartialEq, Eq)]
pub enum CrdState {
    /// Applied: the cluster has the CRD of this build.
    Applied,
    /// Not applied (not allowed, or not asked to), but a CRD is installed: used as it is.
    Existing,
    /// Neither applied nor readable (403): the Machine watch will tell.
    Unverified,
    /// Not installed, and the agent may not or must not install it: nothing can be served.
    Missing(String),
}

/// Applies the CRD (field manager `provisioner`, forced: the agent owns its schema) when
/// `install` is set; on 403, or when not asked to, checks that one exists.
pub async fn ensure_crd(client: Client, install: bool) -> Result<CrdState, kube::Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let name = crd_name();
    if install {
        match api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(Machine::crd()),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(crd = %name, "Machine CRD installed or updated (server-side apply)");
                return Ok(CrdState::Applied);
            }
            Err(kube::Error::Api(e)) if e.code == 403 => {
                tracing::warn!(
                    crd = %name,
                    "not allowed to install or update the Machine CRD ({}); using the one installed. Grant customresourcedefinitions get/create/patch (agent/deploy/rbac.yaml) or set cluster.installCrd: false",
                    e.message
                );
            }
            Err(e) => return Err(e),
        }
    }
    match api.get_opt(&name).await {
        Ok(Some(_)) => Ok(CrdState::Existing),
        Ok(None) => Ok(CrdState::Missing(format!(
            "the Machine CRD {name} is not installed{}: run `provisioner crd | kubectl apply --server-side -f -`",
            if install { " and the agent may not install it" } else { " (cluster.installCrd is false)" }
        ))),
        Err(kube::Error::Api(e)) if e.code == 403 => {
            tracing::warn!(crd = %name, "may not read the Machine CRD ({}): assuming it is installed", e.message);
            Ok(CrdState::Unverified)
        }
        Err(e) => Err(e),
    }
}
