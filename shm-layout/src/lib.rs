//! shm-layout: the bytes.
