//! Hashing, chunking and delta planning; written by a helper, see its module docs.
