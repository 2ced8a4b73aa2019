//! Support for hsm-kms's tests and benchmarks; nothing here is part of the service.

pub mod postgres;
