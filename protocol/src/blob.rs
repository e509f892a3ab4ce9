//! Content the agent fetches and caches by digest: images from the controller's catalogue.

use core::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error as _};

use crate::ids::{IdError, ImageName};
use crate::limits::MAX_URL_LEN;

/// A SHA-256 digest: the identity of a blob's content.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Parses 64 hex digits (either case).
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Self(out))
    }

    /// The first 12 hex digits, for tables and logs.
    pub fn short(&self) -> ShortDigest {
        ShortDigest(*self)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{self}")
    }
}

/// The first 12 hex digits of a digest.
#[derive(Clone, Copy)]
pub struct ShortDigest(Digest);

impl fmt::Display for ShortDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0.0[..6] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Content an agent fetches from its controller, verifies and caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlobRef {
    /// Its SHA-256.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// A boot file: one already in the node's image directory, or content from the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Image {
    /// A file in the agent's image directory, placed there by other means.
    File(ImageName),
    /// Catalogue content, fetched by digest and cached.
    Blob(BlobRef),
}

impl Image {
    /// The file name, when it is one.
    pub const fn file(&self) -> Option<&ImageName> {
        match self {
            Self::File(f) => Some(f),
            Self::Blob(_) => None,
        }
    }

    /// The blob, when it is one.
    pub const fn blob(&self) -> Option<&BlobRef> {
        match self {
            Self::File(_) => None,
            Self::Blob(b) => Some(b),
        }
    }
}

impl From<ImageName> for Image {
    fn from(n: ImageName) -> Self {
        Self::File(n)
    }
}

impl fmt::Display for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(n) => write!(f, "{n}"),
            Self::Blob(b) => write!(f, "sha256:{}", b.digest.short()),
        }
    }
}

/// An `http://` or `https://` base URL: printable ASCII without spaces, at most
/// [`MAX_URL_LEN`] bytes.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct BaseUrl(heapless::String<MAX_URL_LEN>);

impl BaseUrl {
    /// Checks and builds one.
    pub fn new(s: &str) -> Result<Self, IdError> {
        const WHAT: &str = "base URL";
        if !(s.starts_with("http://") || s.starts_with("https://")) {
            return Err(IdError::BadScheme(WHAT));
        }
        if let Some(c) = s.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(IdError::BadChar(WHAT, c));
        }
        let mut out = heapless::String::new();
        out.push_str(s.trim_end_matches('/'))
            .map_err(|_| IdError::TooLong(WHAT, MAX_URL_LEN))?;
        Ok(Self(out))
    }

    /// The URL, without a trailing `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for BaseUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for BaseUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = heapless::String::<MAX_URL_LEN>::deserialize(d)?;
        Self::new(raw.as_str()).map_err(D::Error::custom)
    }
}

/// Where and how a node fetches blobs: `{url}/v1/nodes/{node}/blobs/{digest}` with the bearer
/// token (the controller's HMAC of the node's id: only this node's desired state carries it).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FetchFrom {
    /// The controller's image endpoint.
    pub url: BaseUrl,
    /// The node's token for it.
    pub token: [u8; 32],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_and_print_as_hex() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let d = Digest::parse(hex).expect("valid");
        assert_eq!(std::format!("{d}"), hex);
        assert_eq!(std::format!("{}", d.short()), "e3b0c44298fc");
        assert!(Digest::parse(&hex[1..]).is_none());
        assert!(Digest::parse(&hex.replace('e', "g")).is_none());
        assert_eq!(Digest::parse(&hex.to_uppercase()), Some(d));
    }

    #[test]
    fn base_urls_are_http_and_bounded() {
        assert_eq!(
            BaseUrl::new("http://ctl:8080/").expect("valid").as_str(),
            "http://ctl:8080"
        );
        assert!(BaseUrl::new("ftp://x").is_err());
        assert!(BaseUrl::new("http://a b").is_err());
        assert!(BaseUrl::new(&std::format!("http://{}", "a".repeat(MAX_URL_LEN))).is_err());
    }
}
