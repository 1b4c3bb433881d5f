//! The active's standbys: attach a new one (handshake), service each attached stream
//! (feedback, heartbeats, detach).

use super::*;

pub(super) enum ReplicaPhase {
    /// Waiting for the standby's hello on the feedback ring.
    AwaitHello,
    /// Streaming; `cursor` is the snapshot progress if a catch-up is under way.
    Streaming(Option<Snapshot>),
}

/// Where a catch-up's walk of the store is (see `catch_up`).
pub(super) struct Snapshot {
    pub(super) units_after: crate::store::UnitCursor,
    pub(super) units_done: bool,
    pub(super) records_after: Option<(u16, Vec<u8>)>,
    pub(super) records_done: bool,
    /// Items sent so far (for the operator).
    pub(super) units_sent: u64,
    pub(super) records_sent: u64,
}

impl Snapshot {
    pub(super) fn new() -> Snapshot {
        Snapshot {
            units_after: crate::store::UnitCursor::START,
            units_done: false,
            records_after: None,
            records_done: false,
            units_sent: 0,
            records_sent: 0,
        }
    }

    /// Every unit and record was sent.
    pub(super) fn is_done(&self) -> bool {
        self.units_done && self.records_done
    }
}

pub(super) struct Replica {
    pub(super) slot: usize,
    pub(super) gen: u64,
    pub(super) stream_region: Region,
    pub(super) feedback_region: Region,
    pub(super) stream: Producer<RegionMemory>,
    pub(super) feedback: Consumer<RegionMemory>,
    pub(super) phase: ReplicaPhase,
    pub(super) agreement: Option<Agreement>,
    pub(super) hot: bool,
    /// Catch-up steps taken for this replica: the snapshot's begin, each chunk or piece
    /// sent, its end (for the operator's log and the test hook that untethers at a step).
    pub(super) catchup_steps: u64,
}

/// How long the active waits for a standby's ring file to be ready when it attaches (the
/// standby made it before announcing its generation; next housekeeping tries again).
const REPLICA_OPEN_WAIT: Duration = Duration::from_millis(1);

impl<A: Application, I: Input> Engine<A, I> {
    /// Drop replica `i` for good (this attach generation is never reopened); keep the first
    /// close reason (the standby's own, e.g. a corrupt stream).
    pub(super) fn detach(&mut self, i: usize, why: &str) {
        let rep = self.replicas.remove(i);
        self.detached.push((rep.slot, rep.gen));
        warn!(slot = %control::slot_name(rep.slot), "standby detached: {why}");
        if rep.stream_region.closed().is_none() {
            rep.stream_region.close(CLOSE_DETACHED);
        }
    }

    /// Drop replica `i` that cannot keep up: it is marked stale and must catch up again.
    pub(super) fn untether(&mut self, i: usize, why: &str) {
        let rep = self.replicas.remove(i);
        self.detached.push((rep.slot, rep.gen));
        warn!(slot = %control::slot_name(rep.slot), "standby untethered: {why}");
        if let Some(k) = &self.counters {
            k.add(Counter::UNTETHERS_TOTAL, 1);
        }
        rep.stream_region.close(CLOSE_UNTETHERED);
        // A standby still in its catch-up (`SNAP_END` not sent) cannot go hot on this stream
        // and holds a partial store: it publishes its own state when it sees the close.
        if matches!(rep.phase, ReplicaPhase::Streaming(None)) {
            // SYNC POINT (store → store): the close is ordered before `Stale`; pairs with the
            // standby's `Hot`-then-re-read in `Engine::become_hot`, so a closed stream never
            // leaves `Hot` in its slot.
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            self.control
                .set(rep.slot, Field::State, State::Stale as u64);
        }
    }

    /// Find standbys that announced a new attach generation in our epoch and open them.
    pub(super) fn attach_new_replicas(&mut self) {
        for slot in 0..control::SLOTS {
            if slot == self.opt.slot {
                continue;
            }
            let c = &self.control;
            if Role::from_word(c.get(slot, Field::Role)) != Role::Standby
                || c.get(slot, Field::Epoch) != self.epoch
            {
                continue;
            }
            let gen = c.get(slot, Field::AttachGen);
            if self.replicas.iter().any(|r| r.slot == slot && r.gen == gen)
                || self.detached.contains(&(slot, gen))
            {
                continue;
            }
            self.replicas.retain(|r| r.slot != slot);
            // Regions opened ahead of a planned step-up (see `preopen_next`) skip the file work.
            let pre = match self.preopened.take() {
                Some(p) if p.slot == slot && p.epoch == self.epoch && p.gen == gen => {
                    Some((p.stream_region, p.feedback_region))
                }
                _ => None,
            };
            match self.open_replica(slot, gen, pre) {
                // A transaction may take up to our own ring's capacity (`Tx::limit`): a
                // standby whose stream is smaller would be untethered by the first large one.
                // Refuse it, saying what to set, rather than accept it and lose it later.
                Ok(mut r) if r.stream.capacity() < self.opt.ring_capacity => {
                    let msg = format!(
                        "the standby's stream ring holds {} bytes; this active's transactions may take up to {} (its ring_capacity): start the standby with a ring at least as large",
                        r.stream.capacity(),
                        self.opt.ring_capacity
                    );
                    warn!(slot = %control::slot_name(slot), "standby refused: {msg}");
                    let _ = r.stream.try_publish(rt::REFUSE, 1, 0, msg.as_bytes());
                    r.stream_region.close(CLOSE_REFUSED);
                    self.detached.push((slot, gen));
                }
                Ok(r) => {
                    debug!(slot = %control::slot_name(slot), gen, "standby attaching");
                    self.replicas.push(r);
                    // Invariant: one replica per slot (an older generation was dropped above).
                    debug_assert_eq!(self.replicas.iter().filter(|r| r.slot == slot).count(), 1);
                }
                Err(e) => {
                    debug!(slot = %control::slot_name(slot), "standby not ready to attach: {e}")
                }
            }
        }
    }

    /// Open the stream and feedback rings a standby in `slot` made for attach generation
    /// `gen` (or take the ones opened ahead, `pre`) and check they are this epoch's.
    fn open_replica(
        &self,
        slot: usize,
        gen: u64,
        pre: Option<(Region, Region)>,
    ) -> Result<Replica, EngineError> {
        let (stream_region, feedback_region) = match pre {
            Some(p) => p,
            None => (
                Region::open(
                    &Control::stream_path(&self.opt.dir, self.epoch, slot, gen),
                    REPLICA_OPEN_WAIT,
                )?,
                Region::open(
                    &Control::feedback_path(&self.opt.dir, self.epoch, slot, gen),
                    REPLICA_OPEN_WAIT,
                )?,
            ),
        };
        // Untrusted: the files must be this epoch's stream and feedback rings.
        for (r, kind) in [
            (&stream_region, KIND_STREAM),
            (&feedback_region, KIND_FEEDBACK),
        ] {
            if r.kind() != kind || r.epoch() != self.epoch {
                return Err(EngineError::Other(format!(
                    "{}: expected a ring of kind {kind} for epoch {}, found kind {} epoch {}",
                    r.path().display(),
                    self.epoch,
                    r.kind(),
                    r.epoch()
                )));
            }
        }
        stream_region.set_producer_identity(self.me);
        feedback_region.set_consumer_identity(self.me);
        let mut stream = stream_region.producer()?;
        // One checksum per transaction (batch) on the replication stream, not one per record,
        // or none (`Options::integrity`): the standby is our own peer; client rings keep
        // theirs per frame.
        stream.set_integrity(self.opt.integrity.ring());
        let feedback = feedback_region.consumer()?;
        Ok(Replica {
            slot,
            gen,
            stream_region,
            feedback_region,
            stream,
            feedback,
            phase: ReplicaPhase::AwaitHello,
            agreement: None,
            hot: false,
            catchup_steps: 0,
        })
    }

    /// Handshakes, catch-up chunks, acks, detaches.
    pub(super) fn service_replicas(&mut self) {
        let mut i = 0;
        while i < self.replicas.len() {
            match self.service_replica(i) {
                Ok(()) if self.test_untether_at_step(i) => {}
                Ok(()) => i += 1,
                Err(why) => self.detach(i, &why),
            }
        }
        let peers: Vec<u64> = self
            .replicas
            .iter()
            .filter_map(|r| {
                r.agreement
                    .as_ref()
                    .map(|_| self.control.get(r.slot, Field::AppVersion))
            })
            .collect();
        self.control.set(
            self.opt.slot,
            Field::PeerVersion,
            peers.first().copied().unwrap_or(0),
        );
        // The layout every attached standby can read (a departed older peer no longer limits it).
        if let Some(l) = self
            .replicas
            .iter()
            .filter_map(|r| r.agreement.as_ref().map(Agreement::layout_version))
            .min()
        {
            if l != self.agreed_layout {
                self.agreed_layout = l;
                self.control.set(self.opt.slot, Field::Layout, l as u64);
            }
        }
    }

    /// Feedback (hello, acks), then a catch-up chunk; `Err` detaches the replica.
    pub(super) fn service_replica(&mut self, i: usize) -> Result<(), String> {
        let hello_now = self.hello();
        let r = &mut self.replicas[i];
        if r.feedback_region.closed().is_some() || r.stream_region.closed().is_some() {
            return Err("its regions were closed".into());
        }
        let mut began = false;
        // Feedback: hello, acks.
        while r
            .feedback
            .poll(&mut self.buf)
            .map_err(|e| format!("corrupt feedback: {e}"))?
        {
            for f in self.buf.frames() {
                match f.meta.record_type {
                    rt::HELLO if matches!(r.phase, ReplicaPhase::AwaitHello) => {
                        let theirs = Hello::decode(f.payload, f.meta.block_length)
                            .map_err(|e| format!("bad hello: {e}"))?;
                        let start = Start {
                            ours: &hello_now,
                            enabled: self.enabled,
                            store: &self.store,
                            commits: self.commits,
                            epoch: self.epoch,
                        };
                        began |= start_streaming(r, &start, &theirs, &mut self.scratch)?;
                    }
                    rt::ACK => {
                        if let Ok(p) = decode::<Position>(f.payload, f.meta.block_length) {
                            if p.arg == 1 {
                                r.hot = true;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        if began {
            // The first chunk goes at the next housekeeping: the begin is a step of its own.
            return Ok(());
        }
        let chunk = self.opt.catchup_chunk;
        catch_up_step(
            r,
            &self.store,
            self.commits,
            self.epoch,
            chunk,
            &mut self.scratch,
        )
    }
}

/// What the active knows when a standby's hello arrives.
struct Start<'a> {
    ours: &'a Hello,
    enabled: u64,
    store: &'a Store,
    commits: u64,
    epoch: u64,
}

/// Answer a standby's hello: refuse it (a refusal frame, the stream closed), or agree on a
/// layout and start streaming with our hello and either a base position (its store already is
/// ours: hot at once) or a snapshot's begin. True if a catch-up began.
fn start_streaming(
    r: &mut Replica,
    start: &Start<'_>,
    theirs: &Hello,
    scratch: &mut Vec<u8>,
) -> Result<bool, String> {
    let ours = start.ours;
    let a = match negotiate(ours, theirs, start.enabled) {
        Ok(a) => a,
        Err(e) => {
            let msg = format!(
                "{e} (active: {} v{}, standby: {} v{})",
                ours.name, ours.app_version, theirs.name, theirs.app_version
            );
            let _ = r.stream.try_publish(rt::REFUSE, 1, 0, msg.as_bytes());
            r.stream_region.close(CLOSE_REFUSED);
            return Err(format!("refused: {msg}"));
        }
    };
    if a.versions_differ {
        info!(
            ours = ours.app_version,
            theirs = theirs.app_version,
            layout = a.layout_version(),
            "standby runs another version; streaming the agreed layout"
        );
    }
    r.agreement = Some(a);
    let same = theirs.digest == ours.digest && theirs.commits == ours.commits;
    let pos = position_of(start.store, start.commits, start.epoch, 0);
    let mut b = r.stream.batch();
    ours.encode(scratch);
    b.push(rt::HELLO, 1, 48, scratch)
        .map_err(|e| e.to_string())?;
    let first = if same { rt::BASE } else { rt::SNAP_BEGIN };
    b.push(first, 1, 56, zerocopy::IntoBytes::as_bytes(&pos))
        .map_err(|e| e.to_string())?;
    b.commit();
    if same {
        r.phase = ReplicaPhase::Streaming(None);
        r.hot = true;
    } else {
        r.phase = ReplicaPhase::Streaming(Some(Snapshot::new()));
        r.catchup_steps = 1;
    }
    Ok(!same)
}

/// Push with the back-pressure policy: while `push` finds the ring full, wait as long as the
/// standby keeps consuming; give up (false) when it consumed nothing for the policy's bound,
/// at once under `Untether`, or on any other error.
pub(super) fn push_waiting(
    stream: &mut Producer<RegionMemory>,
    policy: Backpressure,
    mut push: impl FnMut(&mut Producer<RegionMemory>) -> Result<(), PushError>,
) -> bool {
    let max = match policy {
        Backpressure::Wait(d) => d,
        Backpressure::Untether => Duration::ZERO,
    };
    // The clock and the standby's tail line are read only once the ring is full: on the
    // per-transaction path a push that fits touches neither (the producer's cached limit
    // decides).
    let mut waiting: Option<(Instant, u64)> = None;
    loop {
        match push(stream) {
            Ok(()) => return true,
            Err(PushError::Full { .. }) => {
                let tail = stream.consumer_position();
                match &mut waiting {
                    None => {
                        crate::counters::note_backpressure_wait();
                        if max.is_zero() {
                            return false;
                        }
                        waiting = Some((Instant::now(), tail));
                    }
                    Some((started, seen_tail)) => {
                        if tail != *seen_tail {
                            *seen_tail = tail;
                            *started = Instant::now();
                        } else if started.elapsed() >= max {
                            return false;
                        }
                    }
                }
                std::hint::spin_loop();
            }
            Err(e) => {
                error!("cannot write to a standby's stream: {e}");
                return false;
            }
        }
    }
}
