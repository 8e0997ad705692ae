//! The calls ext-clone makes on a VMM's REST API (Cloud Hypervisor's `/api/v1` endpoints, plus
//! ext-vmm's `ext/vm.identity`), each on its own connection with a bounded timeout, so a VMM
//! that hangs fails the call instead of the whole command.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ext_vmm_api::{
    ApiClient, VmIdentity, VmIdentityConfig, VmInfo, VmRestoreConfig, VmSnapshotConfig, VmState,
};
use serde::de::DeserializeOwned;

use crate::error::{CloneError, Result};

/// One VMM's API socket.
#[derive(Clone, Debug)]
pub struct VmmApi {
    socket: PathBuf,
    timeout: Duration,
}

impl VmmApi {
    /// The API on `socket`; every call gives up after `timeout`.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        VmmApi {
            socket: socket.into(),
            timeout,
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request; `Ok` holds the status and body of any complete response.
    fn send(&self, method: &str, endpoint: &str, body: Option<Vec<u8>>) -> Result<(u16, Vec<u8>)> {
        let call = |e: String| CloneError::Api {
            socket: self.socket.clone(),
            call: format!("{method} {endpoint}"),
            reason: e,
        };
        let mut client = ApiClient::connect(&self.socket).map_err(|e| call(e.to_string()))?;
        client
            .set_timeout(Some(self.timeout))
            .map_err(|e| call(e.to_string()))?;
        let response = client
            .request(method, endpoint, body.as_deref())
            .map_err(|e| call(e.to_string()))?;
        Ok((response.status, response.body))
    }

    /// A request that must succeed; its body.
    fn call(&self, method: &str, endpoint: &str, body: Option<Vec<u8>>) -> Result<Vec<u8>> {
        let (status, body) = self.send(method, endpoint, body)?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let messages = serde_json::from_slice::<Vec<String>>(&body)
            .map(|m| m.join(": "))
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        Err(CloneError::Api {
            socket: self.socket.clone(),
            call: format!("{method} {endpoint}"),
            reason: format!("status {status}: {messages}"),
        })
    }

    fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        endpoint: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        let bytes = self.call(method, endpoint, body)?;
        serde_json::from_slice(&bytes).map_err(|e| CloneError::Api {
            socket: self.socket.clone(),
            call: format!("{method} {endpoint}"),
            reason: format!("undecodable answer: {e}"),
        })
    }

    fn body<T: serde::Serialize>(value: &T) -> Result<Option<Vec<u8>>> {
        serde_json::to_vec(value)
            .map(Some)
            .map_err(|e| CloneError::Internal(format!("encoding a request body: {e}")))
    }

    /// `GET vmm.ping`: whether the VMM answers at all.
    pub fn ping(&self) -> Result<()> {
        self.call("GET", "vmm.ping", None).map(|_| ())
    }

    /// `GET vm.info`.
    pub fn info(&self) -> Result<VmInfo> {
        self.json("GET", "vm.info", None)
    }

    /// The VM's lifecycle state.
    pub fn state(&self) -> Result<VmState> {
        self.info().map(|info| info.state)
    }

    /// `PUT vm.pause`.
    pub fn pause(&self) -> Result<()> {
        self.call("PUT", "vm.pause", None).map(|_| ())
    }

    /// `PUT vm.resume`.
    pub fn resume(&self) -> Result<()> {
        self.call("PUT", "vm.resume", None).map(|_| ())
    }

    /// `PUT vm.snapshot` into the directory `dir`.
    pub fn snapshot(&self, dir: &Path) -> Result<()> {
        let body = Self::body(&VmSnapshotConfig {
            destination_url: file_url(dir),
            parent: None,
        })?;
        self.call("PUT", "vm.snapshot", body).map(|_| ())
    }

    /// `PUT vm.restore` of the snapshot in `dir` into a VMM without a VM.
    pub fn restore(&self, dir: &Path, mode: &str) -> Result<()> {
        let body = Self::body(&VmRestoreConfig {
            source_url: file_url(dir),
            memory_restore_mode: Some(mode.to_string()),
            resume: Some(false),
            page_server: None,
        })?;
        self.call("PUT", "vm.restore", body).map(|_| ())
    }

    /// `GET ext/vm.identity`; `Ok(None)` when the VMM has no such endpoint (Cloud Hypervisor
    /// v53.0 has no VM generation ID).
    pub fn identity(&self) -> Result<Option<VmIdentity>> {
        let (status, _) = self.send("GET", "ext/vm.identity", None)?;
        if status == 404 {
            return Ok(None);
        }
        self.json("GET", "ext/vm.identity", None).map(Some)
    }

    /// `PUT ext/vm.identity`: a new generation ID (`None`: the VMM draws a random one).
    pub fn set_identity(&self, vmgenid: Option<String>) -> Result<VmIdentity> {
        let body = Self::body(&VmIdentityConfig { vmgenid })?;
        self.json("PUT", "ext/vm.identity", body)
    }

    /// `PUT vmm.shutdown`: the VMM process ends.
    pub fn shutdown_vmm(&self) -> Result<()> {
        self.call("PUT", "vmm.shutdown", None).map(|_| ())
    }
}

/// `file://<dir>`, the snapshot URL both VMMs take.
pub fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}
