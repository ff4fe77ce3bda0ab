//! CRC32C as ext4 and jbd2 use it: the raw register, seeded by the caller,
//! without the final inversion (Linux `crc32c_le`).

const fn table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static TABLE: [u32; 256] = table();

pub fn crc32c(seed: u32, data: &[u8]) -> u32 {
    data.iter().fold(seed, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_the_standard_check_value() {
        // CRC-32C("123456789") = 0xE3069283 with init and xorout ~0.
        assert_eq!(!super::crc32c(!0, b"123456789"), 0xE306_9283);
    }
}
