//! Migration plans (stub).
