use super::*;

const B: u32 = 4096;
const BU: u64 = B as u64;

fn ext(offset: u64, length: u64) -> ByteExtent {
    ByteExtent { offset, length }
}

/// Block-index runs as byte extents, for readable expectations.
fn blocks(runs: &[(u64, u64)]) -> Vec<ByteExtent> {
    runs.iter()
        .map(|&(s, e)| ext(s * BU, (e - s) * BU))
        .collect()
}

fn digests(marks: &[u8]) -> Vec<u8> {
    // Mark 0 stands for a hole (all-zero digest); any other value fills the digest.
    marks.iter().flat_map(|&m| [m; DIGEST_LEN]).collect()
}

fn run(
    size: u64,
    allocated: &[ByteExtent],
    dirty: Option<&[ByteExtent]>,
    previous: Option<&[u8]>,
) -> Result<Plan, String> {
    plan(&PlanInput {
        disk_size: size,
        block_size: B,
        allocated,
        dirty,
        previous_digests: previous,
    })
}

#[test]
fn first_backup_reads_allocated_blocks_rounded_out_and_merged() {
    let allocated = [ext(100, 10), ext(BU + 5, 1), ext(5 * BU, 2 * BU + 1)];
    let p = run(10 * BU, &allocated, None, None).unwrap();
    assert_eq!(p.read, blocks(&[(0, 2), (5, 8)]));
    assert!(p.unchanged.is_empty());
}

#[test]
fn last_block_is_clipped_to_disk_size() {
    let size = 3 * BU + 100;
    let p = run(size, &[ext(0, size)], None, None).unwrap();
    assert_eq!(p.read, vec![ext(0, size)]);
}

#[test]
fn extents_past_the_end_are_clipped() {
    let size = 2 * BU;
    let p = run(size, &[ext(BU, 10 * BU), ext(3 * BU, BU)], None, None).unwrap();
    assert_eq!(p.read, blocks(&[(1, 2)]));
}

#[test]
fn cbt_reads_dirty_and_references_clean_blocks() {
    let allocated = [ext(0, 8 * BU)];
    let dirty = [ext(2 * BU + 1, 1), ext(5 * BU, BU), ext(20 * BU, BU)];
    let previous = digests(&[1; 8]);
    let p = run(8 * BU, &allocated, Some(&dirty), Some(&previous)).unwrap();
    assert_eq!(p.read, blocks(&[(2, 3), (5, 6)]));
    assert_eq!(p.unchanged, blocks(&[(0, 2), (3, 5), (6, 8)]));
}

#[test]
fn previous_hole_now_allocated_is_read_even_when_clean() {
    let allocated = [ext(0, 6 * BU)];
    let dirty = [ext(4 * BU, BU)];
    let previous = digests(&[1, 0, 0, 1, 1, 1]);
    let p = run(6 * BU, &allocated, Some(&dirty), Some(&previous)).unwrap();
    assert_eq!(p.read, blocks(&[(1, 3), (4, 5)]));
    assert_eq!(p.unchanged, blocks(&[(0, 1), (3, 4), (5, 6)]));
}

#[test]
fn holes_are_neither_read_nor_unchanged() {
    let allocated = [ext(0, BU), ext(3 * BU, BU)];
    let dirty = [ext(0, 4 * BU)];
    let previous = digests(&[1, 1, 1, 1]);
    let p = run(4 * BU, &allocated, Some(&dirty), Some(&previous)).unwrap();
    assert_eq!(p.read, blocks(&[(0, 1), (3, 4)]));
    assert!(p.unchanged.is_empty());
}

#[test]
fn without_cbt_everything_allocated_is_read() {
    let previous = digests(&[1, 1, 1]);
    let p = run(3 * BU, &[ext(0, 3 * BU)], None, Some(&previous)).unwrap();
    assert_eq!(p.read, blocks(&[(0, 3)]));
    assert!(p.unchanged.is_empty());
}

#[test]
fn cbt_without_previous_reads_everything_allocated() {
    let p = run(3 * BU, &[ext(0, 3 * BU)], Some(&[]), None).unwrap();
    assert_eq!(p.read, blocks(&[(0, 3)]));
    assert!(p.unchanged.is_empty());
}

#[test]
fn rejects_zero_block_size() {
    let err = plan(&PlanInput {
        disk_size: 10,
        block_size: 0,
        allocated: &[],
        dirty: None,
        previous_digests: None,
    })
    .unwrap_err();
    assert!(err.contains("block size"), "{err}");
}

#[test]
fn rejects_previous_digests_of_wrong_length() {
    let previous = digests(&[1, 1]);
    let err = run(3 * BU, &[], None, Some(&previous)).unwrap_err();
    assert!(err.contains("previous digests"), "{err}");
}

#[test]
fn rejects_overflowing_extent() {
    let err = run(BU, &[ext(u64::MAX, 2)], None, None).unwrap_err();
    assert!(err.contains("allocated"), "{err}");
}

#[test]
fn subtract_and_intersect_cover_partial_overlaps() {
    let a = vec![0..10, 20..30];
    let b = vec![2..4, 8..22, 25..26, 29..40];
    assert_eq!(subtract(&a, &b), vec![0..2, 4..8, 22..25, 26..29]);
    assert_eq!(intersect(&a, &b), vec![2..4, 8..10, 20..22, 25..26, 29..30]);
}

#[test]
fn classify_without_previous_marks_all_new() {
    assert_eq!(
        classify(None, 7, &digests(&[1, 2])).unwrap(),
        vec![true, true]
    );
}

#[test]
fn classify_compares_with_previous_at_absolute_index() {
    let previous = digests(&[1, 2, 3, 4]);
    let got = classify(Some(&previous), 1, &digests(&[2, 9, 4, 5])).unwrap();
    // Index 4 is past the previous disk's end, so it is new.
    assert_eq!(got, vec![false, true, false, true]);
}

#[test]
fn classify_survives_huge_first_block() {
    let previous = digests(&[1]);
    assert_eq!(
        classify(Some(&previous), u64::MAX, &digests(&[1, 1])).unwrap(),
        vec![true, true]
    );
}

#[test]
fn classify_rejects_partial_digest() {
    let err = classify(None, 0, &[0; 33]).unwrap_err();
    assert!(err.contains("multiple of 32"), "{err}");
}
