//! The registry: the set of services and every change to it (deploy, remove, stop, pause,
//! resume). Each change is validated, saved to the state file, then applied and published as
//! a new routing snapshot, so a change that cannot be saved is not made.
//!
//! Deploys of one service are serialised by a per-service lock held for the whole deploy
//! (health wait and drain); deploys of different services run in parallel.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proxy::config::{
    is_valid_host_pattern, normalize_host, normalize_path_prefix, ServiceConfig, TlsConfig,
    DEFAULT_DRAIN_TIMEOUT,
};
use berth_proxy::health::spawn_health_check;
use berth_proxy::upstream::UpstreamClient;
use berth_proxy::{
    ErrorPages, Metrics, PauseState, RolloutSplit, RouteTable, RouteTableHandle, Service,
    ServiceSettings, Target,
};
use futures_util::future::join_all;

use crate::progress::DeployTracker;
use crate::protocol::{
    CertStoreStatus, CertificateStatus, DeployProgress, DeployRequest, RolloutDeployRequest,
    RolloutSetRequest, RolloutStatus, RouteStatus, ServiceList, ServiceSummary, StatusReport,
    TargetStatus,
};
use crate::state::{PersistedPause, ServiceState, State, StateError, StateFile, UnknownKeys};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(String),
    #[error("service not found")]
    ServiceNotFound,
    #[error("host settings conflict with another service")]
    HostConflict,
    #[error("the proxy is handing over to a new process; try again")]
    Upgrading,
    #[error("target failed to become healthy within configured timeout ({target}: {reason})")]
    Unhealthy { target: String, reason: String },
    #[error(transparent)]
    State(#[from] StateError),
}

/// What the registry needs from whoever provides certificates (wired in by the binary, so
/// this crate knows nothing of ACME).
pub trait TlsProvider: Send + Sync + 'static {
    /// Fills in what a deploy left to the daemon (the ACME directory and certificate cache),
    /// so the state file names them as kamal-proxy's does.
    fn complete(&self, config: &mut ServiceConfig);
    /// Refuses TLS settings that cannot work, such as an unreadable certificate file.
    fn check(&self, config: &ServiceConfig) -> Result<(), String>;
    /// Told after every change, with every service's settings.
    fn services_changed(&self, configs: &[&ServiceConfig]);
    fn certificate_status(&self, host: &str) -> Option<CertificateStatus>;
    /// The shared certificate store, when one is in use.
    fn store_status(&self) -> Option<CertStoreStatus> {
        None
    }
}

/// A service's saved rollout.
struct Rollout {
    targets: Vec<String>,
    read_targets: Vec<String>,
    split: Option<RolloutSplit>,
}

struct Entry {
    service: Arc<Service>,
    targets: Vec<String>,
    pause: PersistedPause,
    rollout_targets: Vec<String>,
    rollout_read_targets: Vec<String>,
    rollout: Option<RolloutSplit>,
    /// Keys of the saved service Berth does not know, written back as they were.
    unknown: UnknownKeys,
}

pub struct Registry {
    routes: RouteTableHandle<Service>,
    client: UpstreamClient,
    state_file: StateFile,
    entries: Mutex<BTreeMap<String, Entry>>,
    service_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    tls: Option<Arc<dyn TlsProvider>>,
    metrics: Option<Arc<Metrics>>,
    progress: DeployTracker,
    /// Held shared by every change and exclusively by a handover; `true` once frozen.
    changes: tokio::sync::RwLock<bool>,
}

impl Registry {
    pub fn new(
        routes: RouteTableHandle<Service>,
        client: UpstreamClient,
        state_file: StateFile,
    ) -> Self {
        Self {
            routes,
            client,
            state_file,
            entries: Mutex::new(BTreeMap::new()),
            service_locks: Mutex::new(HashMap::new()),
            tls: None,
            metrics: None,
            progress: DeployTracker::default(),
            changes: tokio::sync::RwLock::new(false),
        }
    }

    /// Stops changes for a handover: waits for changes under way (a deploy finishes), then
    /// refuses new ones with [`RegistryError::Upgrading`] until [`Registry::thaw`].
    pub async fn freeze(&self) {
        *self.changes.write().await = true;
    }

    /// Accepts changes again (after a handover that did not happen).
    pub async fn thaw(&self) {
        *self.changes.write().await = false;
    }

    /// Admits one change unless a handover froze the registry.
    async fn admit_change(&self) -> Result<tokio::sync::RwLockReadGuard<'_, bool>, RegistryError> {
        let guard = self.changes.read().await;
        if *guard {
            tracing::info!("Change refused: handing over to a new process");
            return Err(RegistryError::Upgrading);
        }
        Ok(guard)
    }

    /// Counts deploys and their durations into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn with_tls(mut self, tls: Arc<dyn TlsProvider>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Loads the state file and serves its services at once; restored targets are taken as
    /// healthy, then health-checked.
    ///
    /// A state file this version cannot read (kamal-proxy's own, when switching over with the
    /// same volume) is set aside intact and the daemon starts empty: the next deploy of each
    /// service brings it back, instead of a daemon that cannot start at all.
    pub fn restore(&self) -> Result<usize, StateError> {
        let state = match self.state_file.load() {
            Err(StateError::Parse { path, source }) => {
                let aside = self
                    .state_file
                    .set_aside()
                    .map_err(|source| StateError::Read {
                        path: path.clone(),
                        source,
                    })?;
                tracing::error!(path = %path.display(), set_aside = %aside.display(), error = %source, "State file unreadable; starting with no services");
                State::default()
            }
            other => other?,
        };
        let mut entries = self.lock_entries();
        for mut saved in state.services {
            // A hand-edited file may hold what no deploy would accept; serving it could
            // shadow another service's routes, so it is left out, loudly.
            if let Some(tls) = &self.tls {
                tls.complete(&mut saved.config);
            }
            let checked = validate_service_name(&saved.name)
                .and_then(|()| normalize_config(saved.config.clone()))
                .and_then(|config| {
                    if entries.contains_key(&saved.name) {
                        return Err(RegistryError::Invalid("the name appears twice".into()));
                    }
                    check_conflicts(&entries, &saved.name, &config).map(|()| config)
                });
            match checked {
                Ok(config) => saved.config = config,
                Err(error) => {
                    tracing::error!(service = %saved.name, %error, "Saved service not restored: its settings are not valid");
                    continue;
                }
            }
            let error_pages = load_error_pages(&saved.config).unwrap_or_else(|error| {
                tracing::warn!(service = %saved.name, %error, "Custom error pages unavailable; using built-in pages");
                ErrorPages::default()
            });
            let service = Arc::new(Service::new(
                &saved.name,
                ServiceSettings {
                    config: saved.config.clone(),
                    error_pages,
                },
            ));
            let restore_targets = |addresses: &[String]| -> Vec<Arc<Target>> {
                let targets: Vec<Arc<Target>> = addresses
                    .iter()
                    .filter_map(|address| match Target::new(address, saved.config.health_check.clone()) {
                        Ok(target) => Some(Arc::new(target)),
                        Err(error) => {
                            tracing::warn!(service = %saved.name, %error, "Skipping unusable saved target");
                            None
                        }
                    })
                    .collect();
                for target in &targets {
                    target.assume_healthy();
                    spawn_health_check(target, self.client.clone());
                }
                targets
            };
            service.replace_targets(restore_targets(&saved.targets));
            service.replace_readers(restore_targets(&saved.config.read_targets));
            service.replace_rollout_targets(restore_targets(&saved.rollout_targets));
            service.replace_rollout_readers(restore_targets(&saved.rollout_read_targets));
            service.set_rollout_split(saved.rollout.clone());
            service.set_pause_state(match &saved.pause {
                PersistedPause::Running => PauseState::Running,
                PersistedPause::Paused { max_pause } => PauseState::Paused {
                    max_pause: max_pause.get(),
                },
                PersistedPause::Stopped { message } => PauseState::Stopped {
                    message: message.clone(),
                },
            });
            entries.insert(
                saved.name.clone(),
                Entry {
                    service,
                    targets: saved.targets,
                    pause: saved.pause,
                    rollout_targets: saved.rollout_targets,
                    rollout_read_targets: saved.rollout_read_targets,
                    rollout: saved.rollout,
                    unknown: saved.unknown,
                },
            );
        }
        self.publish(&entries);
        Ok(entries.len())
    }

    /// Deploys `targets` for `name`: waits for them to be healthy (unless forced), makes them
    /// the service's targets, then drains the old ones. The old targets keep serving if the
    /// new ones never become healthy.
    pub async fn deploy(&self, name: &str, request: DeployRequest) -> Result<(), RegistryError> {
        let started = std::time::Instant::now();
        let result = self.deploy_unobserved(name, request).await;
        if let Some(metrics) = &self.metrics {
            // A deploy refused for a handover was never tried; the client retries it.
            if !matches!(result, Err(RegistryError::Upgrading)) {
                metrics.observe_deploy(name, result.is_ok(), started.elapsed());
            }
        }
        result
    }

    async fn deploy_unobserved(
        &self,
        name: &str,
        request: DeployRequest,
    ) -> Result<(), RegistryError> {
        let _admitted = self.admit_change().await?;
        validate_service_name(name)?;
        let mut config = request.config;
        if let Some(tls) = &self.tls {
            tls.complete(&mut config);
        }
        let config = normalize_config(config)?;
        if config.tls.enabled && !serves_root_path(&config) {
            return Err(RegistryError::Invalid(
                "TLS settings must be specified on the root path service".into(),
            ));
        }
        if request.targets.is_empty() {
            return Err(RegistryError::Invalid(
                "at least one target is required".into(),
            ));
        }
        let error_pages =
            load_error_pages(&config).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        if let Some(tls) = &self.tls {
            tls.check(&config).map_err(RegistryError::Invalid)?;
        }
        let new_targets = |addresses: &[String]| -> Result<Vec<Arc<Target>>, RegistryError> {
            addresses
                .iter()
                .map(|address| Target::new(address, config.health_check.clone()).map(Arc::new))
                .collect::<Result<_, _>>()
                .map_err(|e| RegistryError::Invalid(e.to_string()))
        };
        let targets = new_targets(&request.targets)?;
        let readers = new_targets(&config.read_targets)?;
        // Writers and readers alike must be healthy before any serves.
        let all: Vec<Arc<Target>> = targets.iter().chain(&readers).cloned().collect();

        let lock = self.service_lock(name);
        let _deploying = lock.lock().await;
        self.check_conflicts(name, &config)?;

        tracing::info!(service = name, targets = ?request.targets, read_targets = ?config.read_targets, hosts = ?config.hosts, "Deploying");
        let started = std::time::Instant::now();
        let _tracked = self.progress.track(name);
        self.progress
            .health_check(name, &all, request.deploy_timeout.get());
        for target in &all {
            spawn_health_check(target, self.client.clone());
        }
        if request.force {
            all.iter().for_each(|target| target.assume_healthy());
        } else if let Err(error) = wait_all_healthy(&all, request.deploy_timeout.get()).await {
            all.iter().for_each(|target| target.retire());
            tracing::info!(service = name, %error, "Deploy failed; previous targets keep serving");
            return Err(error);
        }

        let old_targets = match self.swap_in(
            name,
            &request.targets,
            config,
            error_pages,
            &targets,
            &readers,
        ) {
            Ok(old) => old,
            Err(error) => {
                all.iter().for_each(|target| target.retire());
                return Err(error);
            }
        };

        self.progress
            .draining(name, &old_targets, request.drain_timeout.get());
        let cut = drain_all(&old_targets, request.drain_timeout.get()).await;
        tracing::info!(
            service = name,
            targets = ?request.targets,
            duration_ms = started.elapsed().as_millis() as u64,
            requests_cut = cut,
            "Deployed"
        );
        Ok(())
    }

    /// The deploy's commit: saves the new targets and settings, then makes them serve (and
    /// gives the host's path services the root service's TLS settings, as kamal-proxy does).
    /// Returns the targets replaced, writers and readers.
    fn swap_in(
        &self,
        name: &str,
        addresses: &[String],
        config: ServiceConfig,
        error_pages: ErrorPages,
        targets: &[Arc<Target>],
        readers: &[Arc<Target>],
    ) -> Result<Vec<Arc<Target>>, RegistryError> {
        let mut entries = self.lock_entries();
        // Checked again: another service may have claimed the host while we waited.
        check_conflicts(&entries, name, &config)?;
        let config = inherit_root_tls(&entries, name, config);
        let followers = path_services_following(&entries, name, &config);
        let mut next_state = snapshot(&entries);
        match next_state.services.iter_mut().find(|s| s.name == name) {
            Some(existing) => {
                existing.targets = addresses.to_vec();
                existing.config = config.clone();
            }
            None => next_state.services.push(ServiceState {
                name: name.to_string(),
                targets: addresses.to_vec(),
                config: config.clone(),
                ..ServiceState::default()
            }),
        }
        for (follower, follower_config) in &followers {
            if let Some(saved) = next_state.services.iter_mut().find(|s| &s.name == follower) {
                saved.config = follower_config.clone();
            }
        }
        self.state_file.save(&next_state)?;
        for (follower, follower_config) in followers {
            if let Some(entry) = entries.get(&follower) {
                let error_pages = entry.service.settings().error_pages.clone();
                entry.service.set_settings(ServiceSettings {
                    config: follower_config,
                    error_pages,
                });
            }
        }
        let entry = entries.entry(name.to_string()).or_insert_with(|| Entry {
            service: Arc::new(Service::new(
                name,
                ServiceSettings {
                    config: ServiceConfig::default(),
                    error_pages: ErrorPages::default(),
                },
            )),
            targets: Vec::new(),
            pause: PersistedPause::Running,
            rollout_targets: Vec::new(),
            rollout_read_targets: Vec::new(),
            rollout: None,
            unknown: UnknownKeys::default(),
        });
        entry.service.set_settings(ServiceSettings {
            config,
            error_pages,
        });
        entry.targets = addresses.to_vec();
        let mut old = entry.service.replace_targets(targets.to_vec());
        old.extend(entry.service.replace_readers(readers.to_vec()));
        self.publish(&entries);
        Ok(old)
    }

    /// Takes a service out of routing and forgets it; its targets drain in the background.
    pub async fn remove(&self, name: &str) -> Result<(), RegistryError> {
        let _admitted = self.admit_change().await?;
        let lock = self.service_lock(name);
        let _changing = lock.lock().await;
        let removed = {
            let mut entries = self.lock_entries();
            if !entries.contains_key(name) {
                return Err(RegistryError::ServiceNotFound);
            }
            let mut next_state = snapshot(&entries);
            next_state.services.retain(|s| s.name != name);
            self.state_file.save(&next_state)?;
            let removed = entries.remove(name).map(|entry| entry.service);
            self.publish(&entries);
            removed
        };
        self.service_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(service) = removed {
            let mut targets = service.replace_targets(Vec::new());
            targets.extend(service.replace_readers(Vec::new()));
            targets.extend(service.replace_rollout_targets(Vec::new()));
            targets.extend(service.replace_rollout_readers(Vec::new()));
            tokio::spawn(async move { drain_all(&targets, DEFAULT_DRAIN_TIMEOUT.get()).await });
        }
        tracing::info!(service = name, "Removed");
        Ok(())
    }

    /// Serves 503 (with `message`) to new requests, then waits for in-flight ones.
    pub async fn stop(
        &self,
        name: &str,
        drain_timeout: Duration,
        message: Option<String>,
    ) -> Result<(), RegistryError> {
        let _admitted = self.admit_change().await?;
        let service = self.set_pause(
            name,
            PersistedPause::Stopped {
                message: message.clone(),
            },
            PauseState::Stopped { message },
        )?;
        service.wait_idle(drain_timeout).await;
        Ok(())
    }

    /// Holds new requests (up to `max_pause`), then waits for in-flight ones.
    pub async fn pause(
        &self,
        name: &str,
        drain_timeout: Duration,
        max_pause: Duration,
    ) -> Result<(), RegistryError> {
        let _admitted = self.admit_change().await?;
        let persisted = PersistedPause::Paused {
            max_pause: berth_proxy::GoDuration(max_pause),
        };
        let live = PauseState::Paused { max_pause };
        let service = self.set_pause(name, persisted, live)?;
        service.wait_idle(drain_timeout).await;
        Ok(())
    }

    pub async fn resume(&self, name: &str) -> Result<(), RegistryError> {
        let _admitted = self.admit_change().await?;
        self.set_pause(name, PersistedPause::Running, PauseState::Running)?;
        Ok(())
    }

    /// Deploys canary targets for an existing service: waits for them to be healthy, makes
    /// them the rollout targets, then drains the previous rollout targets. They get traffic
    /// once `rollout_set` gives them a share.
    pub async fn rollout_deploy(
        &self,
        name: &str,
        request: RolloutDeployRequest,
    ) -> Result<(), RegistryError> {
        let _admitted = self.admit_change().await?;
        if request.targets.is_empty() {
            return Err(RegistryError::Invalid(
                "at least one target is required".into(),
            ));
        }
        let lock = self.service_lock(name);
        let _deploying = lock.lock().await;
        let service = self.service(name)?;
        let health_check = service.settings().config.health_check.clone();
        let new_targets = |addresses: &[String]| -> Result<Vec<Arc<Target>>, RegistryError> {
            addresses
                .iter()
                .map(|address| Target::new(address, health_check.clone()).map(Arc::new))
                .collect::<Result<_, _>>()
                .map_err(|e| RegistryError::Invalid(e.to_string()))
        };
        let targets = new_targets(&request.targets)?;
        let readers = new_targets(&request.read_targets)?;
        let all: Vec<Arc<Target>> = targets.iter().chain(&readers).cloned().collect();
        tracing::info!(service = name, targets = ?request.targets, read_targets = ?request.read_targets, "Deploying rollout targets");
        for target in &all {
            spawn_health_check(target, self.client.clone());
        }
        if let Err(error) = wait_all_healthy(&all, request.deploy_timeout.get()).await {
            all.iter().for_each(|target| target.retire());
            return Err(error);
        }
        let replaced = self.change_rollout(name, |rollout| {
            rollout.targets = request.targets.clone();
            rollout.read_targets = request.read_targets.clone();
        });
        let old = match replaced {
            Ok(()) => {
                let mut old = service.replace_rollout_targets(targets);
                old.extend(service.replace_rollout_readers(readers));
                old
            }
            Err(error) => {
                all.iter().for_each(|target| target.retire());
                return Err(error);
            }
        };
        drain_all(&old, request.drain_timeout.get()).await;
        tracing::info!(service = name, targets = ?request.targets, "Rollout targets deployed");
        Ok(())
    }

    /// Sends `percent` of cookie values, and the allowlisted ones always, to the rollout
    /// targets.
    pub async fn rollout_set(
        &self,
        name: &str,
        request: RolloutSetRequest,
    ) -> Result<(), RegistryError> {
        let _admitted = self.admit_change().await?;
        let mut split = RolloutSplit::new(request.percent, request.allowlist)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        split.assign_cookies = request.assign_cookies;
        let lock = self.service_lock(name);
        let _changing = lock.lock().await;
        let service = self.service(name)?;
        if service.rollout_pool().targets().is_empty() {
            return Err(RegistryError::Invalid("rollout target not set".into()));
        }
        self.change_rollout(name, |rollout| rollout.split = Some(split.clone()))?;
        tracing::info!(service = name, percent = split.percent, allowlist = ?split.allowlist, "Rollout split set");
        service.set_rollout_split(Some(split));
        Ok(())
    }

    /// Ends the split: all traffic goes to the main targets. The rollout targets stay (as in
    /// kamal-proxy), so a later `rollout set` sends traffic to them again.
    pub async fn rollout_stop(&self, name: &str) -> Result<(), RegistryError> {
        let _admitted = self.admit_change().await?;
        let lock = self.service_lock(name);
        let _changing = lock.lock().await;
        let service = self.service(name)?;
        self.change_rollout(name, |rollout| rollout.split = None)?;
        service.set_rollout_split(None);
        tracing::info!(service = name, "Rollout stopped");
        Ok(())
    }

    /// What the deploy of `name` under way waits for, if one is.
    pub fn deploy_progress(&self, name: &str) -> Option<DeployProgress> {
        self.progress.report(name)
    }

    fn service(&self, name: &str) -> Result<Arc<Service>, RegistryError> {
        self.lock_entries()
            .get(name)
            .map(|entry| Arc::clone(&entry.service))
            .ok_or(RegistryError::ServiceNotFound)
    }

    /// Changes a service's saved rollout (targets and split): saved first, then recorded,
    /// under one lock so no other change saves a state without it.
    fn change_rollout(
        &self,
        name: &str,
        change: impl FnOnce(&mut Rollout),
    ) -> Result<(), RegistryError> {
        let mut entries = self.lock_entries();
        let entry = entries.get(name).ok_or(RegistryError::ServiceNotFound)?;
        let mut rollout = Rollout {
            targets: entry.rollout_targets.clone(),
            read_targets: entry.rollout_read_targets.clone(),
            split: entry.rollout.clone(),
        };
        change(&mut rollout);
        let mut next_state = snapshot(&entries);
        if let Some(saved) = next_state.services.iter_mut().find(|s| s.name == name) {
            saved.rollout_targets = rollout.targets.clone();
            saved.rollout_read_targets = rollout.read_targets.clone();
            saved.rollout = rollout.split.clone();
        }
        self.state_file.save(&next_state)?;
        if let Some(entry) = entries.get_mut(name) {
            entry.rollout_targets = rollout.targets;
            entry.rollout_read_targets = rollout.read_targets;
            entry.rollout = rollout.split;
        }
        Ok(())
    }

    pub fn list(&self) -> ServiceList {
        let entries = self.lock_entries();
        let services = entries
            .iter()
            .map(|(name, entry)| {
                let settings = entry.service.settings();
                ServiceSummary {
                    name: name.clone(),
                    hosts: settings.config.hosts.clone(),
                    path_prefixes: settings.config.path_prefixes.clone(),
                    targets: entry.targets.clone(),
                    read_targets: settings.config.read_targets.clone(),
                    state: entry.service.pause_state().name().to_string(),
                    tls: settings.config.tls.enabled,
                }
            })
            .collect();
        ServiceList { services }
    }

    pub fn status(&self) -> StatusReport {
        let entries = self.lock_entries();
        let mut routes = Vec::new();
        for (name, entry) in entries.iter() {
            let settings = entry.service.settings();
            let targets: Vec<TargetStatus> = entry
                .service
                .pool()
                .targets()
                .iter()
                .map(|target| target_status(target))
                .collect();
            let read_targets: Vec<TargetStatus> = entry
                .service
                .readers()
                .targets()
                .iter()
                .map(|target| target_status(target))
                .collect();
            let rollout_pool = entry.service.rollout_pool();
            let rollout = (!rollout_pool.targets().is_empty()).then(|| RolloutStatus {
                targets: rollout_pool
                    .targets()
                    .iter()
                    .map(|target| target_status(target))
                    .collect(),
                read_targets: entry
                    .service
                    .rollout_readers()
                    .targets()
                    .iter()
                    .map(|target| target_status(target))
                    .collect(),
                split: entry.service.rollout_split().map(|split| (*split).clone()),
            });
            let hosts = if settings.config.hosts.is_empty() {
                vec!["*".to_string()]
            } else {
                settings.config.hosts.clone()
            };
            for host in &hosts {
                let certificate = match &self.tls {
                    Some(tls) if settings.config.tls.enabled => tls.certificate_status(host),
                    _ => None,
                };
                for path in &settings.config.path_prefixes {
                    routes.push(RouteStatus {
                        host: host.clone(),
                        path: path.clone(),
                        service: name.clone(),
                        state: entry.service.pause_state().name().to_string(),
                        tls: settings.config.tls.enabled,
                        targets: targets.clone(),
                        read_targets: read_targets.clone(),
                        certificate: certificate.clone(),
                        rollout: rollout.clone(),
                    });
                }
            }
        }
        routes.sort_by(|a, b| (&a.host, &a.path).cmp(&(&b.host, &b.path)));
        let cert_store = self.tls.as_ref().and_then(|tls| tls.store_status());
        StatusReport { routes, cert_store }
    }

    fn set_pause(
        &self,
        name: &str,
        persisted: PersistedPause,
        live: PauseState,
    ) -> Result<Arc<Service>, RegistryError> {
        let mut entries = self.lock_entries();
        let Some(entry) = entries.get(name) else {
            return Err(RegistryError::ServiceNotFound);
        };
        let service = Arc::clone(&entry.service);
        let mut next_state = snapshot(&entries);
        if let Some(saved) = next_state.services.iter_mut().find(|s| s.name == name) {
            saved.pause = persisted.clone();
        }
        self.state_file.save(&next_state)?;
        if let Some(entry) = entries.get_mut(name) {
            entry.pause = persisted;
        }
        service.set_pause_state(live);
        tracing::info!(
            service = name,
            state = service.pause_state().name(),
            "Service state changed"
        );
        Ok(service)
    }

    fn check_conflicts(&self, name: &str, config: &ServiceConfig) -> Result<(), RegistryError> {
        check_conflicts(&self.lock_entries(), name, config)
    }

    fn publish(&self, entries: &BTreeMap<String, Entry>) {
        let mut table = RouteTable::default();
        for entry in entries.values() {
            let settings = entry.service.settings();
            table.insert(
                &settings.config.hosts,
                &settings.config.path_prefixes,
                &entry.service,
            );
        }
        self.routes.publish(table);
        if let Some(tls) = &self.tls {
            let settings: Vec<_> = entries
                .values()
                .map(|entry| entry.service.settings())
                .collect();
            let configs: Vec<&ServiceConfig> = settings.iter().map(|s| &s.config).collect();
            tls.services_changed(&configs);
        }
    }

    fn service_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.service_locks.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(locks.entry(name.to_string()).or_default())
    }

    fn lock_entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        // A panic while holding the lock cannot leave the map half-changed (every change is
        // a single insert/remove), so a poisoned lock is still safe to use.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn target_status(target: &Target) -> TargetStatus {
    let report = target.health_report();
    TargetStatus {
        address: target.address().to_string(),
        health: report.health,
        last_failure: report.last_failure,
        in_flight: target.in_flight(),
    }
}

fn snapshot(entries: &BTreeMap<String, Entry>) -> State {
    State {
        services: entries
            .iter()
            .map(|(name, entry)| ServiceState {
                name: name.clone(),
                targets: entry.targets.clone(),
                config: entry.service.settings().config.clone(),
                pause: entry.pause.clone(),
                rollout_targets: entry.rollout_targets.clone(),
                rollout_read_targets: entry.rollout_read_targets.clone(),
                rollout: entry.rollout.clone(),
                unknown: entry.unknown.clone(),
            })
            .collect(),
    }
}

fn check_conflicts(
    entries: &BTreeMap<String, Entry>,
    name: &str,
    config: &ServiceConfig,
) -> Result<(), RegistryError> {
    let claims = |config: &ServiceConfig| -> Vec<(String, String)> {
        let hosts = if config.hosts.is_empty() {
            vec![String::new()]
        } else {
            config.hosts.clone()
        };
        hosts
            .iter()
            .flat_map(|host| {
                config
                    .path_prefixes
                    .iter()
                    .map(move |path| (host.clone(), path.clone()))
            })
            .collect()
    };
    let wanted = claims(config);
    for (other_name, other) in entries {
        if other_name == name {
            continue;
        }
        let taken = claims(&other.service.settings().config);
        if wanted.iter().any(|claim| taken.contains(claim)) {
            tracing::info!(service = name, conflicting_service = %other_name, "Host settings conflict");
            return Err(RegistryError::HostConflict);
        }
    }
    Ok(())
}

fn serves_root_path(config: &ServiceConfig) -> bool {
    config.path_prefixes.iter().any(|prefix| prefix == "/")
}

fn shares_a_host(a: &ServiceConfig, b: &ServiceConfig) -> bool {
    a.hosts.iter().any(|host| b.hosts.contains(host))
}

/// The TLS settings a path service takes from its host's root service: one host is served
/// with one certificate and one redirect policy, whichever service a path reaches.
fn take_tls_from(tls: &mut TlsConfig, root: &TlsConfig) {
    tls.enabled = root.enabled;
    tls.redirect = root.redirect;
    tls.acme_directory.clone_from(&root.acme_directory);
    tls.acme_cache_path.clone_from(&root.acme_cache_path);
    tls.certificate_path.clone_from(&root.certificate_path);
    tls.private_key_path.clone_from(&root.private_key_path);
}

/// A service without the root path, on a host whose root service is another, takes that
/// service's TLS settings (kamal-proxy stores and lists them as the path service's own).
fn inherit_root_tls(
    entries: &BTreeMap<String, Entry>,
    name: &str,
    mut config: ServiceConfig,
) -> ServiceConfig {
    if serves_root_path(&config) {
        return config;
    }
    let root = entries.iter().find_map(|(other, entry)| {
        let settings = entry.service.settings();
        (other != name
            && serves_root_path(&settings.config)
            && shares_a_host(&settings.config, &config))
        .then(|| settings.config.tls.clone())
    });
    if let Some(root) = root {
        take_tls_from(&mut config.tls, &root);
    }
    config
}

/// The path services on `root`'s hosts whose TLS settings change with it, with their new
/// settings.
fn path_services_following(
    entries: &BTreeMap<String, Entry>,
    name: &str,
    root: &ServiceConfig,
) -> Vec<(String, ServiceConfig)> {
    if !serves_root_path(root) {
        return Vec::new();
    }
    entries
        .iter()
        .filter(|(other, _)| other.as_str() != name)
        .filter_map(|(other, entry)| {
            let current = &entry.service.settings().config;
            if serves_root_path(current) || !shares_a_host(current, root) {
                return None;
            }
            let mut config = current.clone();
            take_tls_from(&mut config.tls, &root.tls);
            (config != *current).then(|| (other.clone(), config))
        })
        .collect()
}

fn validate_service_name(name: &str) -> Result<(), RegistryError> {
    let valid = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "invalid service name {name:?}: use letters, digits, '-', '_' and '.'"
        )))
    }
}

/// Normalises hosts and prefixes and refuses combinations kamal-proxy refuses.
pub fn normalize_config(mut config: ServiceConfig) -> Result<ServiceConfig, RegistryError> {
    let invalid = |message: &str| Err(RegistryError::Invalid(message.to_string()));
    config.hosts = config
        .hosts
        .iter()
        .map(|h| normalize_host(h))
        .filter(|h| !h.is_empty())
        .collect();
    config.hosts.dedup();
    for host in &config.hosts {
        if !is_valid_host_pattern(host) {
            return Err(RegistryError::Invalid(format!(
                "invalid host {host:?}: expected a name such as app.example.com or *.example.com, without a port"
            )));
        }
    }
    if config.path_prefixes.is_empty() {
        config.path_prefixes.push("/".to_string());
    }
    config.path_prefixes = config
        .path_prefixes
        .iter()
        .map(|p| normalize_path_prefix(p))
        .collect();
    config.path_prefixes.sort();
    config.path_prefixes.dedup();

    let tls = &config.tls;
    let custom_certificate = tls.certificate_path.is_some() || tls.private_key_path.is_some();
    if tls.certificate_path.is_some() != tls.private_key_path.is_some() {
        return invalid("tls-certificate-path and tls-private-key-path must be given together");
    }
    if tls.enabled {
        if config.hosts.is_empty() && tls.on_demand_url.is_none() {
            return invalid("host must be set when using TLS");
        }
        if tls.on_demand_url.is_some() && (!config.hosts.is_empty() || custom_certificate) {
            return invalid("tls-on-demand-url cannot be used with hosts or custom certificates");
        }
        if !custom_certificate && config.hosts.iter().any(|h| h.starts_with("*.")) {
            return invalid("automatic TLS certificates cannot be used with wildcard hosts");
        }
    }
    // Without hosts, kamal-proxy takes any canonical host (every host redirects to it).
    if let Some(canonical) = &tls.canonical_host {
        if !config.hosts.is_empty() && !config.hosts.contains(&normalize_host(canonical)) {
            return invalid("canonical host must be one of the service's hosts");
        }
    }
    // Kamal can pass `--buffer-requests=false --max-request-body=N`; kamal-proxy keeps the
    // limit and ignores it, and so do we (it applies only to a buffered body).
    if config.buffering.max_request_body > 0 && !config.buffering.requests {
        tracing::warn!("max-request-body has no effect without request buffering");
    }
    if config.buffering.max_response_body > 0 && !config.buffering.responses {
        tracing::warn!("max-response-body has no effect without response buffering");
    }
    Ok(config)
}

fn load_error_pages(config: &ServiceConfig) -> Result<ErrorPages, berth_proxy::ErrorPagesError> {
    match &config.error_pages {
        Some(dir) => ErrorPages::load(std::path::Path::new(dir)),
        None => Ok(ErrorPages::default()),
    }
}

async fn wait_all_healthy(targets: &[Arc<Target>], timeout: Duration) -> Result<(), RegistryError> {
    let waits = targets.iter().map(|target| async move {
        target
            .wait_until_healthy(timeout)
            .await
            .map_err(|reason| RegistryError::Unhealthy {
                target: target.address().to_string(),
                reason,
            })
    });
    join_all(waits).await.into_iter().collect()
}

async fn drain_all(targets: &[Arc<Target>], timeout: Duration) -> usize {
    let drains = targets.iter().map(|target| target.drain(timeout));
    join_all(drains).await.into_iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hosts: &[&str]) -> ServiceConfig {
        ServiceConfig {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            ..ServiceConfig::default()
        }
    }

    #[tokio::test]
    async fn restore_leaves_out_saved_services_no_deploy_would_accept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kamal-proxy.state");
        std::fs::write(
            &path,
            r#"{"version":1,"services":[
              {"name":"good","targets":["127.0.0.1:1"],"config":{"hosts":["a.test"]}},
              {"name":"wild","targets":["127.0.0.1:1"],"config":{"hosts":["*.a.test"],"tls":{"enabled":true}}},
              {"name":"clash","targets":["127.0.0.1:1"],"config":{"hosts":["a.test"]}},
              {"name":"good","targets":["127.0.0.1:2"],"config":{"hosts":["b.test"]}},
              {"name":"ported","targets":["127.0.0.1:1"],"config":{"hosts":["c.test:8080"]}}]}"#,
        )
        .unwrap();
        let registry = Registry::new(
            RouteTableHandle::default(),
            berth_proxy::upstream::upstream_client(Duration::from_millis(10)),
            StateFile::new(&path),
        );
        assert_eq!(registry.restore().unwrap(), 1);
        let names: Vec<String> = registry
            .list()
            .services
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["good"]);
    }

    #[test]
    fn tls_needs_a_host() {
        let mut tls_without_host = config(&[]);
        tls_without_host.tls.enabled = true;
        assert!(normalize_config(tls_without_host).is_err());

        let mut wildcard = config(&["*.a.test"]);
        wildcard.tls.enabled = true;
        assert!(normalize_config(wildcard).is_err());
    }

    #[test]
    fn canonical_host_must_be_served() {
        let mut c = config(&["a.test"]);
        c.tls.canonical_host = Some("b.test".into());
        assert!(normalize_config(c).is_err());
        // Without hosts, as kamal-proxy does, any canonical host is taken.
        let mut any_host = config(&[]);
        any_host.tls.canonical_host = Some("b.test".into());
        assert!(normalize_config(any_host).is_ok());
    }

    #[test]
    fn a_body_limit_without_buffering_is_kept_and_ignored_as_kamal_proxy_does() {
        let mut c = config(&["a.test"]);
        c.buffering.max_request_body = 10;
        assert_eq!(normalize_config(c).unwrap().buffering.max_request_body, 10);
    }

    #[test]
    fn hosts_and_prefixes_are_normalised() {
        let mut c = config(&["App.Test.", "app.test"]);
        c.path_prefixes = vec!["api/".into()];
        let c = normalize_config(c).unwrap();
        assert_eq!(c.hosts, vec!["app.test"]);
        assert_eq!(c.path_prefixes, vec!["/api"]);
    }
}
