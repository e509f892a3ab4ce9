//! End-to-end tests of Outpost: the real broker and real libvirt, driven from `tests/tests/`.
