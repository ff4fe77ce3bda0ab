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
