//! The controller's tests. `harness`: a mock API server (tower-test) that checks and answers
//! every request; `scenarios`: the controller, token, CRD and user-data steps against it;
//! `pipeline`: the whole controller against a mock that keeps its objects (writes per change);
//! `bench`: 1000 Machines against the mock (`tests/bench/status-patch.sh`); `live`: the same
//! code against a real kube-apiserver + etcd.

mod bench;
mod harness;
mod live;
mod pipeline;
mod scenarios;
