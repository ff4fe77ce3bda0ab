use super::*;

#[test]
fn behaviours_parse_and_unknown_ones_are_listed() {
    assert_eq!(
        Behaviour::parse("memory-bomb").unwrap(),
        Behaviour::MemoryBomb
    );
    let err = Behaviour::parse("explode").unwrap_err();
    assert!(
        err.contains("`behaviour`") && err.contains("open-file"),
        "{err}"
    );
}

#[test]
fn wrong_shape_breaks_both_count_and_sum() {
    let input = Batch {
        data: vec![7; 10],
        lengths: vec![4, 6],
    };
    let out = wrong_shape(input);
    assert_ne!(out.lengths.len(), 2);
    assert_ne!(
        out.lengths.iter().map(|&l| l as usize).sum::<usize>(),
        out.data.len()
    );
}

#[test]
fn lossy_loses_the_last_byte_of_each_block() {
    let input = Batch {
        data: vec![1, 2, 3, 4, 5, 6, 0],
        lengths: vec![3, 4],
    };
    let coded = lossy(input);
    assert_eq!(coded.lengths, vec![2, 3]);
    let back = pad(coded, &[3, 4]);
    assert_eq!(back.lengths, vec![3, 4]);
    // The first block ended in 3 and comes back ending in 0; the second
    // ended in 0 and comes back whole.
    assert_eq!(back.data, vec![1, 2, 0, 4, 5, 6, 0]);
}
