//! Apply: what a standby does with each committed batch of its stream — the store's changes
//! (with the application's `on_apply`), the commit record, and the control frames (hello, base
//! position, snapshot begin and end, feature switch, step-up, refusal). One method per record
//! type; each returns `Err` for a frame that must not be applied (the standby resyncs) and
//! `Ok(Some(_))` for a frame that changes the role.

use super::*;

impl<A: Application, I: Input> Engine<A, I> {
    /// Read the next committed batch of `u`'s stream and apply it: `Ok(None)` when nothing
    /// is committed, `Ok(Some(r))` with what applying it gave (`Ok(Some(_))` inside when the
    /// batch changes the role), `Err` for a batch that fails validation (nothing applied).
    ///
    /// How it is read is [`STANDBY_READS_IN_PLACE`]'s choice: validated in place (views
    /// into the ring, released in bursts) or copied out first (released per batch).
    #[inline]
    pub(super) fn read_and_apply(
        &mut self,
        u: &mut Upstream,
        state: &mut State,
    ) -> Result<Option<Result<Option<Follow>, EngineError>>, shm_layout::ring::ReadError> {
        if STANDBY_READS_IN_PLACE {
            let Some(view) = u.stream.read_batch()? else {
                return Ok(None);
            };
            // The view lives until the next read: the active cannot write these bytes while
            // they are applied (the consumer releases them only at a later read).
            return Ok(Some(self.apply_frames(
                view.frames(),
                state,
                &u.stream_region,
            )));
        }
        if !u.stream.poll(&mut self.buf)? {
            return Ok(None);
        }
        let frames = std::mem::take(&mut self.buf);
        let r = self.apply_frames(frames.frames(), state, &u.stream_region);
        self.buf = frames;
        Ok(Some(r))
    }

    fn apply_frames<'f>(
        &mut self,
        frames: impl Iterator<Item = Frame<'f>>,
        state: &mut State,
        stream: &Region,
    ) -> Result<Option<Follow>, EngineError> {
        for f in frames {
            let (payload, bl) = (f.payload, f.meta.block_length);
            match f.meta.record_type {
                t @ (rt::PUT_UNIT | rt::RETIRE_UNIT | rt::PUT | rt::DELETE) => {
                    self.apply_change(t, payload, bl)?
                }
                rt::COMMIT => self.apply_commit(payload, bl, *state)?,
                rt::HELLO => self.apply_hello(payload, bl)?,
                rt::BASE => *state = self.apply_base(payload, bl, stream)?,
                rt::SNAP_BEGIN => *state = self.apply_snapshot_begin(payload, bl)?,
                rt::SNAP_END => *state = self.apply_snapshot_end(payload, bl, stream)?,
                rt::FEATURES => self.apply_features(payload, bl)?,
                rt::HEARTBEAT => {}
                rt::STEP_UP => {
                    let p: Position = decode(payload, bl).map_err(other)?;
                    if p.digest != self.store.digest() || p.commits != self.commits {
                        warn!("step-up description differs: active {} commits digest {:#x}, standby {} digest {:#x}; stepping up, the old active will catch up", p.commits, p.digest, self.commits, self.store.digest());
                    }
                    return Ok(Some(Follow::StepUp { planned: true }));
                }
                rt::REFUSE => {
                    return Err(EngineError::Refused(
                        String::from_utf8_lossy(payload).into_owned(),
                    ));
                }
                unknown => {
                    return Err(EngineError::Other(format!(
                        "unknown record type {unknown} in the stream"
                    )));
                }
            }
        }
        Ok(None)
    }

    /// A change to the store: what it replaces is copied out for `on_apply` first.
    fn apply_change(&mut self, t: u16, payload: &[u8], bl: u16) -> Result<(), EngineError> {
        let op = protocol::decode_op_into(t, payload, bl, &mut self.tx.spare).map_err(other)?;
        self.before.capture(&self.store, &op);
        self.store.apply(&op);
        self.app.on_apply(&op, self.before.view(), &self.store);
        self.tx.spare.recycle(op);
        Ok(())
    }

    /// A transaction's commit. Invariant: a hot standby applies every transaction the active
    /// committed, in order (its count equals the commits received); a syncing one's live
    /// transactions start at the snapshot's position and never go back.
    fn apply_commit(&mut self, payload: &[u8], bl: u16, state: State) -> Result<(), EngineError> {
        let (c, _) = protocol::decode_commit(payload, bl).map_err(other)?;
        let in_order = if state == State::Hot {
            c.index == self.commits
        } else {
            c.index >= self.commits
        };
        if !in_order {
            return Err(EngineError::Other(format!(
                "commit out of order: expected transaction {}{}, found {}",
                if state == State::Hot { "" } else { "at least " },
                self.commits,
                c.index
            )));
        }
        self.commits = c.index + 1;
        if let Some(k) = &self.counters {
            k.add(Counter::APPLIED_TOTAL, 1);
            k.set(Counter::TX_INDEX, self.commits);
        }
        Ok(())
    }

    /// The active's hello: agree on the layout, learn its enabled features.
    fn apply_hello(&mut self, payload: &[u8], bl: u16) -> Result<(), EngineError> {
        let s = self.opt.slot;
        let theirs = Hello::decode(payload, bl).map_err(other)?;
        let ours = self.hello();
        let a = negotiate(&ours, &theirs, 0).map_err(|e| EngineError::Refused(e.to_string()))?;
        if a.versions_differ {
            info!(
                ours = ours.app_version,
                theirs = theirs.app_version,
                layout = a.layout_version(),
                "active runs another version"
            );
        }
        self.agreed_layout = a.layout_version();
        self.enabled = theirs.enabled;
        self.write_versions = write_versions(&self.templates, &self.features, self.enabled);
        self.control
            .set(s, Field::PeerVersion, theirs.app_version as u64);
        self.control
            .set(s, Field::Layout, self.agreed_layout as u64);
        self.control.set(s, Field::Features, self.enabled);
        self.control.set(s, Field::Enableable, a.enableable);
        Ok(())
    }

    /// Our store already is the active's state: hot without a catch-up.
    fn apply_base(
        &mut self,
        payload: &[u8],
        bl: u16,
        stream: &Region,
    ) -> Result<State, EngineError> {
        let p = self.same_state_as(payload, bl, "the base position")?;
        self.consistent = true;
        drop_off_thread(self.prefix.take());
        let state = self.become_hot(stream);
        if state == State::Hot {
            info!(slot = %control::slot_name(self.opt.slot), commits = p.commits, "hot (no catch-up needed)");
        }
        Ok(state)
    }

    /// A catch-up begins: the store starts empty (a consistent copy is kept aside, see
    /// `Prefix`), the live transactions that follow start at the snapshot's position.
    fn apply_snapshot_begin(&mut self, payload: &[u8], bl: u16) -> Result<State, EngineError> {
        let s = self.opt.slot;
        let p: Position = decode(payload, bl).map_err(other)?;
        // Emptying a store of millions of units takes tens to hundreds of ms: the old one is
        // dropped on a thread of its own, so the standby keeps draining the stream while the
        // active streams live traffic beside the snapshot.
        let old = std::mem::take(&mut self.store);
        if self.consistent {
            // Kept until the catch-up ends (see `Prefix`).
            drop_off_thread(self.prefix.replace(Box::new(Prefix {
                store: old,
                commits: self.commits,
            })));
        } else {
            drop_off_thread(old);
        }
        self.consistent = false;
        self.app.on_snapshot_begin(&self.store);
        self.set_commits(p.commits);
        self.control.set(s, Field::State, State::Syncing as u64);
        info!(slot = %control::slot_name(s), units = p.units, "catch-up begins");
        Ok(State::Syncing)
    }

    /// The catch-up is complete: our store must be the active's state at this point.
    fn apply_snapshot_end(
        &mut self,
        payload: &[u8],
        bl: u16,
        stream: &Region,
    ) -> Result<State, EngineError> {
        let p = self.same_state_as(payload, bl, "the catch-up's end")?;
        self.app.on_reset(&self.store);
        self.consistent = true;
        drop_off_thread(self.prefix.take());
        let state = self.become_hot(stream);
        if state == State::Hot {
            info!(slot = %control::slot_name(self.opt.slot), units = p.units, "hot (caught up)");
        }
        if let Some(k) = &self.counters {
            k.add(Counter::CATCHUPS_TOTAL, 1);
        }
        Ok(state)
    }

    /// Our transaction count set other than by applying a commit (a catch-up's start, a
    /// return to the kept copy): the live counters follow, or a catch-up that ends after the
    /// last live transaction left `tx_index` at the count before it.
    pub(super) fn set_commits(&mut self, commits: u64) {
        self.commits = commits;
        if let Some(k) = &self.counters {
            k.set(Counter::TX_INDEX, commits);
        }
    }

    /// Decode a position frame and check that our store is the state it describes.
    fn same_state_as(&self, payload: &[u8], bl: u16, what: &str) -> Result<Position, EngineError> {
        let p: Position = decode(payload, bl).map_err(other)?;
        if p.digest != self.store.digest() || p.commits != self.commits {
            return Err(EngineError::Other(format!(
                "{what}: expected the active's state ({} transactions, digest {:#x}), found {} transactions, digest {:#x} on this standby",
                p.commits, p.digest, self.commits, self.store.digest()
            )));
        }
        Ok(p)
    }

    /// The active enabled features at this point of the stream.
    fn apply_features(&mut self, payload: &[u8], bl: u16) -> Result<(), EngineError> {
        let fb: FeaturesBlock = decode(payload, bl).map_err(other)?;
        self.enabled = fb.enabled;
        self.write_versions = write_versions(&self.templates, &self.features, self.enabled);
        self.control
            .set(self.opt.slot, Field::Features, self.enabled);
        info!(enabled = fb.enabled, "features switched");
        Ok(())
    }
}

fn other(e: impl std::fmt::Display) -> EngineError {
    EngineError::Other(e.to_string())
}
