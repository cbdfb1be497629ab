from plait.token_ids import common_prefix_len


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len((1, 2), [1, 2, 3]) == 2
    assert common_prefix_len([], [1]) == 0 and common_prefix_len([7], [8]) == 0
