//! Comparing secrets (a leaf: the token table, the nodes' blob tokens and the broker's
//! passwords all use it).

/// Compares two secrets in time independent of where they differ (a wrong guess says nothing
/// about the right one). The API's tokens, the nodes' blob tokens and the broker's passwords
/// are all compared with it.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
