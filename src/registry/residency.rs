//! Which versions hold memory, and how much: the per-device budget
//! (`--model_memory_budget`), the ledger of what resident versions and loads in progress
//! hold against it, and the choice of what to evict when a load needs room.
//!
//! Every load reserves its estimate (its model file's size, on each device it runs on)
//! before it starts, and settles to the bytes measured once it has loaded (a module's
//! tensors, a package's constants): the ledger never holds more than the budget. A load
//! that does not fit evicts idle on-demand versions, least recently used first; a version
//! with a request queued or running holds a lease and is never evicted, nor one loaded
//! less than `--min_residency_seconds` ago. When nothing can go, the load waits for room
//! until its deadline and then fails RESOURCE_EXHAUSTED.

use crate::batching::Scheduler;
use crate::config::MemoryBudget;
use crate::error::Error;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a load with no deadline of its own waits for room before it fails.
pub const ROOM_WAIT: Duration = Duration::from_secs(30);

/// How often a load that waits for room looks again: a freed version wakes it at once,
/// but a lease that ends does not.
const ROOM_POLL: Duration = Duration::from_millis(20);

/// Who is loaded when, and what may be evicted: the residency flags.
#[derive(Clone, Debug, Default)]
pub struct ResidencySettings {
    pub budget: MemoryBudget,
    /// `--on_demand_models`: names, or `*`.
    pub on_demand: Vec<String>,
    /// `--pinned_models`: names, or `*`; a pinned model is never on demand.
    pub pinned: Vec<String>,
    /// `--min_residency_seconds`.
    pub min_residency: Duration,
    /// `--unload_first_models`: names, or `*`.
    pub unload_first: Vec<String>,
}

fn names(list: &[String], model: &str) -> bool {
    list.iter().any(|name| name == "*" || name == model)
}

impl ResidencySettings {
    /// Whether `model`'s versions load on their first request (and may be evicted).
    pub fn is_on_demand(&self, model: &str) -> bool {
        names(&self.on_demand, model) && !names(&self.pinned, model)
    }

    /// Whether `model`'s old version unloads before its new one loads.
    pub fn is_unload_first(&self, model: &str) -> bool {
        names(&self.unload_first, model)
    }
}

/// Bytes per device, keyed by the device's name (`cpu`, `cuda:N`).
pub type DeviceBytes = BTreeMap<String, u64>;

#[derive(Default)]
struct Books {
    /// What resident versions and loads in progress hold, per device.
    held: DeviceBytes,
    /// The part of `held` whose versions are being evicted (freed once their workers stop).
    freeing: DeviceBytes,
    /// The devices on which a load that outgrew its estimate waits for room. A second load
    /// that outgrew its own there gives way instead of waiting too: each would hold what
    /// the other waits for until both time out.
    growing: BTreeSet<String>,
}

/// Why a load found no room in the budget.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoRoom {
    /// It measured more than its estimate while another load that did the same waits for
    /// room on the same device: it frees what it loaded so that the other can finish, and
    /// may be tried again.
    #[error("{0}")]
    GaveWay(String),
    /// None came before the deadline, or it needs more than a whole budget.
    #[error("{0}")]
    Refused(String),
}

impl From<NoRoom> for Error {
    fn from(no_room: NoRoom) -> Error {
        Error::ResourceExhausted(no_room.to_string())
    }
}

/// A growing load's claim on [`Books::growing`]; given back on drop.
struct Growing<'a> {
    ledger: &'a Ledger,
    devices: Vec<String>,
}

impl Drop for Growing<'_> {
    fn drop(&mut self) {
        let mut books = self.ledger.books();
        for device in &self.devices {
            books.growing.remove(device);
        }
    }
}

/// The ledger of the budget: see the module docs.
pub struct Ledger {
    budget: MemoryBudget,
    books: Mutex<Books>,
    /// Signalled whenever bytes are given back.
    freed: tokio::sync::Notify,
    /// When the process started: `last_used` stamps count from here.
    epoch: Instant,
}

impl Ledger {
    pub fn new(budget: MemoryBudget) -> Arc<Ledger> {
        for (device, bytes) in &budget.devices {
            crate::telemetry::set_memory_budget(device, *bytes);
        }
        Arc::new(Ledger {
            budget,
            books: Mutex::new(Books::default()),
            freed: tokio::sync::Notify::new(),
            epoch: Instant::now(),
        })
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Milliseconds since the ledger's epoch: a `last_used` stamp.
    pub fn now_stamp(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Takes `bytes` off one column of the books (`held`, or `freeing`) and wakes the loads
    /// waiting for room.
    fn give_back(&self, column: impl FnOnce(&mut Books) -> &mut DeviceBytes, bytes: &DeviceBytes) {
        {
            let mut books = self.books();
            let column = column(&mut books);
            for (device, given) in bytes {
                if let Some(count) = column.get_mut(device) {
                    *count = count.saturating_sub(*given);
                }
            }
        }
        self.freed.notify_waiters();
    }

    /// Whether `needs` fits the budget at all (on every budgeted device, no more than its
    /// whole budget): if so, a failure to find room for it is a matter of timing.
    pub fn could_ever_fit(&self, needs: &DeviceBytes) -> bool {
        needs
            .iter()
            .all(|(device, &bytes)| self.budget.of(device).is_none_or(|budget| bytes <= budget))
    }

    /// Reserves `needs` if they fit now. `Err` says, per device, how many bytes are
    /// missing beyond what is already being freed (empty: wait, room is on its way), or
    /// that the needs exceed a whole budget.
    fn try_reserve(
        self: &Arc<Ledger>,
        needs: &DeviceBytes,
    ) -> Result<Charge, Result<DeviceBytes, String>> {
        let mut books = self.books();
        let mut missing = DeviceBytes::new();
        let mut short = false;
        for (device, &bytes) in needs {
            let Some(budget) = self.budget.of(device) else {
                continue;
            };
            if bytes > budget {
                return Err(Err(format!(
                    "it needs {} on {device}, more than the whole budget of {} \
                     (--model_memory_budget)",
                    human(bytes),
                    human(budget)
                )));
            }
            let held = books.held.get(device).copied().unwrap_or(0);
            let over = held.saturating_add(bytes).saturating_sub(budget);
            let freeing = books.freeing.get(device).copied().unwrap_or(0);
            short |= over > 0;
            if over > freeing {
                missing.insert(device.clone(), over - freeing);
            }
        }
        if short {
            return Err(Ok(missing));
        }
        for (device, &bytes) in needs {
            *books.held.entry(device.clone()).or_default() += bytes;
        }
        Ok(Charge {
            ledger: Arc::clone(self),
            bytes: needs.clone(),
        })
    }

    /// Reserves `needs`, evicting what `evict` offers (least recently used first) and
    /// waiting for room until `deadline` (or [`ROOM_WAIT`]). `what` names the load for
    /// errors.
    pub async fn reserve(
        self: &Arc<Ledger>,
        what: &str,
        needs: &DeviceBytes,
        deadline: Option<Instant>,
        evict: impl FnMut(&DeviceBytes) -> Vec<Eviction>,
    ) -> Result<Charge, NoRoom> {
        self.find_room(what, needs, deadline, evict, false).await
    }

    /// [`Ledger::reserve`], for a load that already holds its estimate (`growth`) or not.
    /// A growing load that can evict nothing more, where another growing load waits,
    /// gives way.
    async fn find_room(
        self: &Arc<Ledger>,
        what: &str,
        needs: &DeviceBytes,
        deadline: Option<Instant>,
        mut evict: impl FnMut(&DeviceBytes) -> Vec<Eviction>,
        growth: bool,
    ) -> Result<Charge, NoRoom> {
        let deadline = deadline.unwrap_or_else(|| Instant::now() + ROOM_WAIT);
        let mut growing = None;
        loop {
            // Registered before looking, so that bytes freed meanwhile are not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.try_reserve(needs) {
                Ok(charge) => return Ok(charge),
                Err(Err(too_large)) => return Err(NoRoom::Refused(format!("{what}: {too_large}"))),
                // A load whose request has given up takes nobody out of service.
                Err(Ok(missing)) if Instant::now() < deadline => {
                    let evictions = evict(&missing);
                    let stuck = evictions.is_empty() && !missing.is_empty();
                    for eviction in evictions {
                        self.start_freeing(eviction);
                    }
                    if growth && growing.is_none() {
                        growing = self.claim_growth(needs, stuck).map_err(|device| {
                            NoRoom::GaveWay(format!(
                                "{what}: another load that measured more than its estimate \
                                 waits for room on {device}; this one gives way (frees what it \
                                 loaded) so that one of them can finish"
                            ))
                        })?;
                    }
                }
                Err(Ok(_)) => {}
            }
            if Instant::now() >= deadline {
                let books = self.books();
                return Err(NoRoom::Refused(format!(
                    "{what}: no room in the memory budget (needs {}; held {}, of which {} \
                     is being freed; the other resident versions are in use or loaded less \
                     than --min_residency_seconds ago)",
                    show(needs),
                    show(&books.held),
                    show(&books.freeing),
                )));
            }
            let wait = ROOM_POLL.min(deadline.saturating_duration_since(Instant::now()));
            let _ = tokio::time::timeout(wait, freed).await;
        }
    }

    /// Claims the devices of a growing load's `needs` for it (see [`Books::growing`]).
    /// `Err` names a device another growing load has claimed, when this one is `stuck`
    /// (nothing more to evict, room missing): it gives way. Not stuck, it waits unclaimed.
    fn claim_growth(
        &self,
        needs: &DeviceBytes,
        stuck: bool,
    ) -> Result<Option<Growing<'_>>, String> {
        let mut books = self.books();
        let devices: Vec<String> = needs
            .keys()
            .filter(|device| self.budget.of(device).is_some())
            .cloned()
            .collect();
        if let Some(taken) = devices
            .iter()
            .find(|device| books.growing.contains(*device))
        {
            return if stuck { Err(taken.clone()) } else { Ok(None) };
        }
        books.growing.extend(devices.iter().cloned());
        Ok(Some(Growing {
            ledger: self,
            devices,
        }))
    }

    /// Stops an evicted version's workers on a blocking thread; its bytes count as being
    /// freed until they have stopped and released the model.
    fn start_freeing(self: &Arc<Ledger>, eviction: Eviction) {
        let Some(resident) = Arc::into_inner(eviction.resident) else {
            return;
        };
        {
            let mut books = self.books();
            for (device, bytes) in &resident.charge.bytes {
                *books.freeing.entry(device.clone()).or_default() += bytes;
            }
        }
        crate::telemetry::record_eviction(&eviction.model);
        tracing::info!(model = %eviction.model, version = eviction.version, "evicted (least recently used)");
        let freed = Freed {
            ledger: Arc::clone(self),
            bytes: resident.charge.bytes.clone(),
        };
        tokio::task::spawn_blocking(move || {
            resident.shut_down();
            drop(freed);
        });
    }
}

/// Bytes of an evicted version counted as being freed; no longer once dropped, even by a
/// shut-down that panicked (its charge is dropped then too), so the books never keep
/// counting bytes nobody frees.
struct Freed {
    ledger: Arc<Ledger>,
    bytes: DeviceBytes,
}

impl Drop for Freed {
    fn drop(&mut self) {
        self.ledger
            .give_back(|books| &mut books.freeing, &self.bytes);
    }
}

/// What a resident version or a load in progress holds of the budget; given back on drop.
pub struct Charge {
    ledger: Arc<Ledger>,
    bytes: DeviceBytes,
}

impl Charge {
    /// Replaces the estimate with the bytes measured once loaded. More than the estimate
    /// must still fit the budget; `Err` says why not.
    pub fn settle(&mut self, measured: DeviceBytes) -> Result<(), String> {
        let mut books = self.ledger.books();
        for (device, &bytes) in &measured {
            let reserved = self.bytes.get(device).copied().unwrap_or(0);
            let Some(budget) = self.ledger.budget.of(device) else {
                continue;
            };
            let held = books.held.get(device).copied().unwrap_or(0);
            if bytes > reserved && held - reserved + bytes > budget {
                return Err(format!(
                    "it holds {} on {device} once loaded, more than the {} the memory budget \
                     has room for (--model_memory_budget)",
                    human(bytes),
                    human(budget.saturating_sub(held - reserved))
                ));
            }
        }
        for (device, &bytes) in &measured {
            let held = books.held.entry(device.clone()).or_default();
            *held = (*held - self.bytes.get(device).copied().unwrap_or(0)) + bytes;
        }
        for (device, reserved) in &self.bytes {
            if !measured.contains_key(device) {
                let held = books.held.entry(device.clone()).or_default();
                *held = held.saturating_sub(*reserved);
            }
        }
        self.bytes = measured;
        Ok(())
    }

    /// The bytes held, per device.
    pub fn bytes(&self) -> &DeviceBytes {
        &self.bytes
    }

    /// Grows the charge to `measured` on the budgeted devices where it holds less, making
    /// room as [`Ledger::reserve`] does (evicting, waiting until `deadline`): for a version
    /// that turned out larger than its estimate. `what` names the load for errors.
    pub async fn grow_to(
        &mut self,
        what: &str,
        measured: &DeviceBytes,
        deadline: Option<Instant>,
        evict: impl FnMut(&DeviceBytes) -> Vec<Eviction>,
    ) -> Result<(), NoRoom> {
        let extra: DeviceBytes = measured
            .iter()
            .filter(|(device, _)| self.ledger.budget.of(device).is_some())
            .filter_map(|(device, &bytes)| {
                let held = self.bytes.get(device).copied().unwrap_or(0);
                (bytes > held).then(|| (device.clone(), bytes - held))
            })
            .collect();
        if extra.is_empty() {
            return Ok(());
        }
        let ledger = Arc::clone(&self.ledger);
        let mut more = ledger
            .find_room(what, &extra, deadline, evict, true)
            .await?;
        for (device, bytes) in std::mem::take(&mut more.bytes) {
            *self.bytes.entry(device).or_default() += bytes;
        }
        Ok(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.ledger.give_back(|books| &mut books.held, &self.bytes);
    }
}

/// Grows a load's charge to what its model measured (see [`Charge::grow_to`]), from the
/// blocking thread the load runs on; `Err` says why there was no room.
pub type MakeRoom = Box<dyn FnOnce(&mut Charge, &DeviceBytes) -> Result<(), NoRoom> + Send>;

/// A version's running workers and the bytes they hold. A request holds an
/// `Arc<Resident>` (its lease) from before it is queued until it is answered.
pub struct Resident {
    pub scheduler: Scheduler,
    charge: Charge,
    /// When it was loaded (evictions spare the young) and last used (LRU).
    pub(super) loaded_at: Instant,
    pub(super) last_used: AtomicU64,
}

impl Resident {
    /// Settles `charge` to what `scheduler`'s model measured (the scheduler reports it as
    /// `modelgate_model_resident_bytes`), after `make_room` has grown it where the model
    /// measured more than its estimate. Blocking when it does not fit: the workers stop
    /// before the bytes are given back.
    pub fn new(
        scheduler: Scheduler,
        mut charge: Charge,
        make_room: MakeRoom,
    ) -> Result<Resident, NoRoom> {
        let measured: DeviceBytes = scheduler
            .resident_bytes()
            .iter()
            .map(|(device, bytes)| (device.to_string(), *bytes))
            .collect();
        let settled = make_room(&mut charge, &measured)
            .and_then(|()| charge.settle(measured).map_err(NoRoom::Refused));
        if let Err(message) = settled {
            // Its bytes go back only once its workers have stopped and freed the model.
            scheduler.shut_down();
            return Err(message);
        }
        let stamp = charge.ledger.now_stamp();
        Ok(Resident {
            scheduler,
            charge,
            loaded_at: Instant::now(),
            last_used: AtomicU64::new(stamp),
        })
    }

    /// The bytes it holds per device.
    pub fn bytes(&self) -> &DeviceBytes {
        self.charge.bytes()
    }

    /// Marks a use now (for the LRU order).
    pub fn touch(&self) {
        self.last_used
            .store(self.charge.ledger.now_stamp(), Ordering::Relaxed);
    }

    /// Answers what is queued, stops the workers and frees the model, then gives its bytes
    /// back. Blocking.
    pub fn shut_down(self) {
        let Resident {
            scheduler, charge, ..
        } = self;
        scheduler.shut_down();
        crate::runtime::release_freed_memory();
        drop(charge);
    }
}

/// A resident version taken out of service to make room.
pub struct Eviction {
    pub model: String,
    pub version: i64,
    /// The only reference left (the evictor took it from its slot with no lease out).
    pub resident: Arc<Resident>,
}

/// A candidate for eviction: an idle, resident on-demand version.
pub struct Candidate {
    pub model: String,
    pub version: i64,
    pub last_used: u64,
    pub bytes: DeviceBytes,
}

/// Which candidates to evict, least recently used first, until `missing` is covered on
/// every device (only candidates with bytes on a device still short are taken).
pub fn choose_victims(mut candidates: Vec<Candidate>, missing: &DeviceBytes) -> Vec<Candidate> {
    candidates.sort_by_key(|c| c.last_used);
    let mut missing = missing.clone();
    let mut chosen = Vec::new();
    for candidate in candidates {
        if missing.values().all(|&bytes| bytes == 0) {
            break;
        }
        let helps = candidate
            .bytes
            .iter()
            .any(|(device, &bytes)| bytes > 0 && missing.get(device).is_some_and(|&m| m > 0));
        if !helps {
            continue;
        }
        for (device, bytes) in &candidate.bytes {
            if let Some(m) = missing.get_mut(device) {
                *m = m.saturating_sub(*bytes);
            }
        }
        chosen.push(candidate);
    }
    chosen
}

/// Bytes for people: `1.5 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn show(bytes: &DeviceBytes) -> String {
    if bytes.is_empty() {
        return "nothing".into();
    }
    bytes
        .iter()
        .map(|(device, b)| format!("{} on {device}", human(*b)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(entries: &[(&str, u64)]) -> DeviceBytes {
        entries.iter().map(|(d, b)| (d.to_string(), *b)).collect()
    }

    fn candidate(version: i64, last_used: u64, size: u64) -> Candidate {
        Candidate {
            model: "m".into(),
            version,
            last_used,
            bytes: bytes(&[("cpu", size)]),
        }
    }

    #[test]
    fn victims_are_the_least_recently_used_until_the_room_is_there() {
        let candidates = vec![
            candidate(1, 30, 10),
            candidate(2, 10, 10),
            candidate(3, 20, 10),
        ];
        let chosen = choose_victims(candidates, &bytes(&[("cpu", 15)]));
        let versions: Vec<i64> = chosen.iter().map(|c| c.version).collect();
        assert_eq!(versions, vec![2, 3]);
        // A device that is not short is no reason to evict.
        let chosen = choose_victims(vec![candidate(1, 0, 10)], &bytes(&[("cuda:0", 5)]));
        assert!(chosen.is_empty());
    }

    #[test]
    fn the_ledger_never_holds_more_than_the_budget() {
        let ledger = Ledger::new("cpu=100".parse().unwrap());
        let first = ledger.try_reserve(&bytes(&[("cpu", 60)])).ok().unwrap();
        let refused = ledger.try_reserve(&bytes(&[("cpu", 60)])).err().unwrap();
        assert_eq!(refused.unwrap(), bytes(&[("cpu", 20)]));
        assert!(ledger
            .try_reserve(&bytes(&[("cpu", 101)]))
            .err()
            .unwrap()
            .is_err());
        // A device without a budget is not limited.
        let _gpu = ledger
            .try_reserve(&bytes(&[("cuda:0", 1 << 40)]))
            .ok()
            .unwrap();
        drop(first);
        let mut second = ledger.try_reserve(&bytes(&[("cpu", 60)])).ok().unwrap();
        // Measured more than estimated, and still within the budget: settled.
        second.settle(bytes(&[("cpu", 90)])).unwrap();
        assert!(ledger.try_reserve(&bytes(&[("cpu", 20)])).is_err());
        // More than the budget has room for: refused, the estimate stays.
        assert!(second.settle(bytes(&[("cpu", 101)])).is_err());
        drop(second);
        assert!(ledger.try_reserve(&bytes(&[("cpu", 100)])).is_ok());
    }

    #[tokio::test]
    async fn a_load_past_its_deadline_evicts_nobody() {
        let ledger = Ledger::new("cpu=100".parse().unwrap());
        let _held = ledger.try_reserve(&bytes(&[("cpu", 80)])).ok().unwrap();
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let evict = |_: &DeviceBytes| {
            asked.fetch_add(1, Ordering::SeqCst);
            Vec::new()
        };
        let past = Instant::now() - Duration::from_millis(1);
        let refused = ledger
            .reserve("late", &bytes(&[("cpu", 50)]), Some(past), evict)
            .await;
        assert!(matches!(refused, Err(NoRoom::Refused(_))));
        assert_eq!(asked.load(Ordering::SeqCst), 0);
        // Within its deadline the same load asks for victims before giving up.
        let soon = Instant::now() + Duration::from_millis(50);
        let refused = ledger
            .reserve("timely", &bytes(&[("cpu", 50)]), Some(soon), evict)
            .await;
        assert!(refused.is_err());
        assert!(asked.load(Ordering::SeqCst) > 0);
    }

    #[tokio::test]
    async fn of_two_loads_that_outgrew_their_estimates_one_gives_way() {
        let ledger = Ledger::new("cpu=100".parse().unwrap());
        let mut first = ledger.try_reserve(&bytes(&[("cpu", 40)])).ok().unwrap();
        let mut second = ledger.try_reserve(&bytes(&[("cpu", 40)])).ok().unwrap();
        // Each measured 70 once loaded: together they need 140 of 100, and neither is
        // resident, so nothing can evict the other. Without giving way both would wait out
        // the deadline.
        let deadline = Some(Instant::now() + Duration::from_secs(60));
        let measured = bytes(&[("cpu", 70)]);
        let growing = {
            let measured = measured.clone();
            tokio::spawn(async move {
                first
                    .grow_to("first", &measured, deadline, |_| Vec::new())
                    .await
                    .map(|()| first)
            })
        };
        while !ledger.books().growing.contains("cpu") {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let gave_way = second
            .grow_to("second", &measured, deadline, |_| Vec::new())
            .await;
        assert!(matches!(gave_way, Err(NoRoom::GaveWay(_))), "{gave_way:?}");
        // It frees what it loaded, and the first one fits.
        drop(second);
        let first = growing.await.unwrap().unwrap();
        assert_eq!(first.bytes(), &measured);
        assert!(ledger.books().growing.is_empty());
        drop(first);
        assert!(ledger.try_reserve(&bytes(&[("cpu", 100)])).is_ok());
    }

    #[test]
    fn on_demand_pinned_and_unload_first_by_name_or_star() {
        let settings = ResidencySettings {
            on_demand: vec!["*".into()],
            pinned: vec!["keep".into()],
            unload_first: vec!["big".into()],
            ..ResidencySettings::default()
        };
        assert!(settings.is_on_demand("any"));
        assert!(!settings.is_on_demand("keep"));
        assert!(settings.is_unload_first("big"));
        assert!(!settings.is_unload_first("any"));
    }
}
