//! Small helpers shared by the fixtures.

/// Like [`try_free_port`](crate::try_free_port), but panics with a clear
/// message on failure.
pub fn free_port() -> u16 {
    match crate::try_free_port() {
        Ok(port) => port,
        Err(e) => panic!("ferry-testkit: could not find a free TCP port: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_is_nonzero() {
        assert_ne!(free_port(), 0);
    }
}
