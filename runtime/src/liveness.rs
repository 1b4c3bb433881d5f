//! Liveness: process identity, robust mutex, pidfd.
