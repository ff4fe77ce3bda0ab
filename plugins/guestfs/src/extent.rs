#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

impl Extent {
    fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// Clips extents to the disk, drops empty ones, sorts and joins overlapping
/// or touching ones, so the host gets a clean list whatever the config said.
pub fn normalise(mut extents: Vec<Extent>, disk_size: u64) -> Vec<Extent> {
    extents.sort_unstable_by_key(|e| e.offset);
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        let end = e.end().min(disk_size);
        if e.offset >= end {
            continue;
        }
        match out.last_mut() {
            Some(last) if e.offset <= last.end() => {
                last.length = last.length.max(end - last.offset);
            }
            _ => out.push(Extent {
                offset: e.offset,
                length: end - e.offset,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    #[test]
    fn clips_merges_and_drops() {
        let got = normalise(
            vec![e(50, 100), e(0, 10), e(10, 5), e(200, 10), e(90, 5)],
            120,
        );
        assert_eq!(got, vec![e(0, 15), e(50, 70)]);
    }
}
