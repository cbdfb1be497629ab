"""The router's parts without HTTP: the approximate radix tree, routing text, policies, metrics."""

from __future__ import annotations

import pytest

from plait.router.keys import affinity_key, routing_text
from plait.router.metrics import merge_replica_metrics, with_replica_label
from plait.router.policy import CacheAwarePolicy, RoundRobinPolicy, make_policy
from plait.router.tree import ApproxRadixTree


def test_tree_matches_longest_shared_prefix_and_splits_edges():
    tree = ApproxRadixTree(1000)
    tree.insert("hello world")
    assert tree.match("hello world, again") == 11
    assert tree.match("help") == 3
    assert tree.match("xyz") == 0
    tree.insert("hello there")  # splits the edge at "hello "
    assert tree.match("hello there!") == 11 and tree.match("hello world") == 11
    assert tree.size == len("hello ") + len("world") + len("there")
    tree.insert("hello")  # already a prefix: nothing new stored
    assert tree.size == 16


def test_tree_stays_within_its_bound_dropping_least_recently_used():
    tree = ApproxRadixTree(30)
    tree.insert("a" * 10)
    tree.insert("b" * 10)
    tree.insert("c" * 10)
    tree.insert("a" * 10)  # a is the most recent now
    tree.insert("d" * 10)  # over the bound: b (least recently used) goes
    assert tree.size <= 30
    assert tree.match("b" * 10) == 0
    assert tree.match("a" * 10) == 10 and tree.match("d" * 10) == 10
    for i in range(200):
        tree.insert(f"{i:04d}" + "x" * 20)
    assert tree.size <= 30


def test_tree_eviction_collapses_emptied_branches():
    tree = ApproxRadixTree(12)
    tree.insert("shared-aaaa")  # 11 chars
    tree.insert("shared-bbbb")  # splits; 15 chars > 12: the older leaf goes
    assert tree.size <= 12 and tree.match("shared-bbbb") == 11 and tree.match("shared-aaaa") == 7


def test_routing_text_of_each_api_is_bounded_and_stable():
    assert routing_text({"text": "abc"}, 100) == "abc"
    assert routing_text({"text": ["first", "second"]}, 100) == "first"
    assert routing_text({"input_ids": [1, 2, 3]}, 100) == "1,2,3,"
    assert routing_text({"input_ids": [[7, 8], [9]]}, 100) == "7,8,"
    assert routing_text({"prompt": [5, 6]}, 100) == "5,6,"
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    text = routing_text(chat, 100)
    assert "be brief" in text and "hi" in text and text == routing_text(dict(chat), 100)
    longer = {"messages": chat["messages"] + [{"role": "assistant", "content": "hello"}]}
    assert routing_text(longer, 1000).startswith(text)  # a conversation's next turn extends its prefix
    assert len(routing_text({"text": "x" * 10_000}, 64)) == 64
    assert len(routing_text({"input_ids": list(range(10_000))}, 64)) <= 64 + 5
    assert routing_text({"input": "question", "instructions": "sys"}, 100).endswith("question")
    assert routing_text([1, 2], 100) == "" and routing_text({"text": 5}, 100) == ""


def test_affinity_key_is_program_id_else_session_id():
    assert affinity_key({"program_id": "p", "session_id": "s"}) == "p"
    assert affinity_key({"session_id": "s"}) == "s"
    assert affinity_key({"program_id": ""}) is None and affinity_key([1]) is None


def test_cache_aware_sends_a_shared_prefix_to_the_same_replica():
    policy = CacheAwarePolicy(cache_threshold=0.5)
    loads = {"a": 0, "b": 0}
    first = policy.choose("system prompt A " * 4 + "question 1", loads)
    assert first.reason == "cache_miss"
    other = policy.choose("something else entirely " * 3, loads)
    assert other.replica != first.replica  # the smaller (empty) tree takes a new prefix
    again = policy.choose("system prompt A " * 4 + "question 2", loads)
    assert (again.replica, again.reason) == (first.replica, "cache_hit")


def test_cache_aware_falls_back_to_least_loaded_past_both_thresholds():
    policy = CacheAwarePolicy(balance_abs_threshold=4, balance_rel_threshold=1.5)
    policy.choose("prefix " * 10, {"a": 0, "b": 0})  # a holds the prefix
    assert policy.choose("prefix " * 10 + "1", {"a": 4, "b": 0}).replica == "a"  # 4 - 0 is not above 4
    choice = policy.choose("prefix " * 10 + "2", {"a": 5, "b": 0})
    assert (choice.replica, choice.reason) == ("b", "balance")
    assert policy.choose("prefix " * 10 + "3", {"a": 50, "b": 40}).reason == "cache_hit"  # 50 < 40 x 1.5


def test_round_robin_alternates_and_unknown_policy_is_refused():
    policy = RoundRobinPolicy()
    assert [policy.choose("same", {"a": 0, "b": 0}).replica for _ in range(4)] == ["a", "b", "a", "b"]
    assert make_policy("random").choose("x", {"a": 0}).replica == "a"
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("fastest")


def test_replica_label_is_added_to_every_sample():
    assert with_replica_label('m{a="1"} 2', "http://h:1") == 'm{replica="http://h:1",a="1"} 2'
    assert with_replica_label("m 2", "u") == 'm{replica="u"} 2'
    assert with_replica_label("m{} 2", "u") == 'm{replica="u"} 2'
    text = "# HELP x X.\n# TYPE x counter\nx 1\n# TYPE y gauge\ny{k=\"v\"} 3\n"
    merged = merge_replica_metrics({"r1": text, "r2": text})
    lines = merged.splitlines()
    assert lines.count("# TYPE x counter") == 1 and lines.count("# TYPE y gauge") == 1
    assert lines.index('x{replica="r2"} 1') < lines.index("# TYPE y gauge")  # grouped per family
    assert 'y{replica="r1",k="v"} 3' in lines


def test_router_command_needs_a_replica_and_refuses_bad_settings(capsys):
    from plait.cli import main

    assert main(["router"]) == 2
    assert "at least one replica" in capsys.readouterr().err
    assert main(["router", "--replica", "http://h:1", "--cache-threshold", "2"]) == 2
    assert "cache_threshold" in capsys.readouterr().err


def test_router_command_accepts_sglang_spelling_of_worker_urls():
    from plait.cli import build_parser

    args = build_parser().parse_args(["router", "--worker-urls", "http://a:1", "http://b:2", "--replica", "http://c:3",
                                      "--policy", "round_robin"])
    assert args.replicas == ["http://a:1", "http://b:2", "http://c:3"] and args.router_policy == "round_robin"
    serve = build_parser().parse_args(["serve", "--data-parallel-size", "3"])
    assert serve.dp_size == 3 and serve.router_policy == "cache_aware"
