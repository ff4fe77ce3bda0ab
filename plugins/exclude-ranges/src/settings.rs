//! The plugin's settings: `ranges = "OFFSET+LENGTH, ..."` and
//! `partitions = "N, ..."`.

use arca_guestfs::extent::Extent;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Config {
    pub ranges: Vec<Extent>,
    /// 1-based, in the order given.
    pub partitions: Vec<u32>,
}

const SIZE_HELP: &str = "expected OFFSET+LENGTH, each a number with an optional K, M, G, T \
                         (or KiB, MiB, GiB, TiB) binary suffix";

pub fn parse(settings: &[(String, String)]) -> Result<Config, String> {
    let mut config = Config::default();
    let (mut seen_ranges, mut seen_partitions) = (false, false);
    for (key, value) in settings {
        let seen = match key.as_str() {
            "ranges" => &mut seen_ranges,
            "partitions" => &mut seen_partitions,
            other => {
                return Err(format!(
                    "exclude-ranges: unknown setting `{other}` (known: `ranges`, `partitions`)"
                ));
            }
        };
        if std::mem::replace(seen, true) {
            return Err(format!(
                "exclude-ranges: setting `{key}` is given more than once"
            ));
        }
        for item in items(value) {
            if key == "ranges" {
                config.ranges.push(parse_range(item).map_err(|why| {
                    format!("exclude-ranges: setting `ranges`: bad item `{item}`: {why}")
                })?);
            } else {
                config.partitions.push(parse_partition(item).map_err(|why| {
                    format!("exclude-ranges: setting `partitions`: bad item `{item}`: {why}")
                })?);
            }
        }
    }
    Ok(config)
}

/// Comma-separated items; the host renders TOML arrays that way, and may
/// leave quotes around string items.
fn items(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(',')
        .map(|item| item.trim().trim_matches(|c| c == '"' || c == '\'').trim())
        .filter(|item| !item.is_empty())
}

fn parse_range(item: &str) -> Result<Extent, String> {
    let (offset, length) = item.split_once('+').ok_or(SIZE_HELP)?;
    let offset = parse_size(offset)?;
    let length = parse_size(length)?;
    if length == 0 {
        return Err("the length is 0".into());
    }
    offset
        .checked_add(length)
        .ok_or("the range ends past 2^64")?;
    Ok(Extent { offset, length })
}

fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits);
    if number.is_empty() {
        return Err(SIZE_HELP.into());
    }
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => {
            return Err(format!(
                "unknown size suffix `{}`; {SIZE_HELP}",
                suffix.trim()
            ));
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("`{text}` does not fit in 64 bits"))
}

fn parse_partition(item: &str) -> Result<u32, String> {
    match item.parse::<u32>() {
        Ok(0) => Err("partition numbers start at 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a partition number such as 2".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_ranges_with_binary_suffixes() {
        let c = parse(&set(&[(
            "ranges",
            "0+1MiB, 4GiB+512MiB,10+5 , 2k+1K,1T+1tib",
        )]))
        .unwrap();
        let r = |offset, length| Extent { offset, length };
        assert_eq!(
            c.ranges,
            vec![
                r(0, 1 << 20),
                r(4 << 30, 512 << 20),
                r(10, 5),
                r(2048, 1024),
                r(1 << 40, 1 << 40)
            ]
        );
        assert!(c.partitions.is_empty());
    }

    #[test]
    fn parses_partitions_and_quoted_items() {
        let c = parse(&set(&[
            ("partitions", "2, 3"),
            ("ranges", "\"0+1M\",\"1M+1M\""),
        ]))
        .unwrap();
        assert_eq!(c.partitions, vec![2, 3]);
        assert_eq!(c.ranges.len(), 2);
    }

    #[test]
    fn empty_settings_exclude_nothing() {
        assert_eq!(parse(&[]).unwrap(), Config::default());
    }

    #[test]
    fn errors_name_the_setting_and_the_item() {
        for (key, value, bad) in [
            ("ranges", "0+1MiB, 5XB+1", "5XB+1"),
            ("ranges", "12", "12"),
            ("ranges", "1+0", "1+0"),
            ("ranges", "18446744073709551615+1", "18446744073709551615+1"),
            ("ranges", "99999999T+1", "99999999T+1"),
            ("partitions", "1,x", "x"),
            ("partitions", "0", "0"),
        ] {
            let err = parse(&set(&[(key, value)])).unwrap_err();
            assert!(err.contains(&format!("`{key}`")), "{err}");
            assert!(err.contains(&format!("`{bad}`")), "{err}");
        }
    }

    #[test]
    fn rejects_unknown_and_repeated_keys() {
        assert!(
            parse(&set(&[("range", "0+1")]))
                .unwrap_err()
                .contains("`range`")
        );
        let err = parse(&set(&[("partitions", "1"), ("partitions", "2")])).unwrap_err();
        assert!(err.contains("more than once"), "{err}");
    }
}
