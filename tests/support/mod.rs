//! Shared test support. Each integration test uses a part of it.
#![allow(dead_code)]

pub mod apiserver;
