"""The JSON-schema corpus: schemas with documents that must be accepted (valid) and refused (invalid).

Valid documents list object keys in the schema's "properties" order (the order constrained generation
produces them) and add no undeclared keys unless the schema asks for them. Each document is checked
against ``jsonschema`` itself (tests/runtime/constrained/test_corpus.py) so the corpus cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Case:
    name: str
    schema: Any
    valid: list = field(default_factory=list)
    invalid: list = field(default_factory=list)


def _obj(props: dict, required: list | None = None, extra: Any = False, **kw: Any) -> dict:
    schema = {"type": "object", "properties": props, "required": list(props) if required is None else required}
    if extra is not None:
        schema["additionalProperties"] = extra
    schema.update(kw)
    return schema


S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
CASES: list[Case] = []


def case(name: str, schema: Any, valid: list, invalid: list) -> None:
    CASES.append(Case(name, schema, valid, invalid))


# ---------------------------------------------------------------- formats
case("fmt_date", {"type": "string", "format": "date"}, ["2024-02-29", "1999-12-31"], ["2024-13-01", "yesterday", 5])
case("fmt_time", {"type": "string", "format": "time"}, ["23:59:59Z", "08:00:00+02:00"], ["25:00:00Z", "noon"])
case("fmt_datetime", {"type": "string", "format": "date-time"}, ["2024-01-02T03:04:05Z"], ["2024-01-02", "x"])
case("fmt_email", {"type": "string", "format": "email"}, ["ann@example.com", "b.c@d.org"], ["not an email", 3])
case("fmt_uuid", {"type": "string", "format": "uuid"}, ["123e4567-e89b-12d3-a456-426614174000"], ["123", "zzz"])
case("fmt_ipv4", {"type": "string", "format": "ipv4"}, ["192.168.0.1", "8.8.8.8"], ["999.1.1.1", "a.b.c.d"])
case("fmt_uri", {"type": "string", "format": "uri"}, ["https://example.com/a?b=c"], [17])
case("fmt_in_object", _obj({"born": {"type": "string", "format": "date"}, "mail": {"type": "string", "format": "email"}}),
     [{"born": "2000-01-01", "mail": "x@y.io"}], [{"born": "2000-99-01", "mail": "x@y.io"}, {"born": "2000-01-01"}])
case("fmt_date_array", {"type": "array", "items": {"type": "string", "format": "date"}, "maxItems": 2},
     [["2020-01-01"], []], [["2020-01-01", "2020-01-02", "2020-01-03"], ["Jan"]])

# ---------------------------------------------------------------- enums and const
case("enum_str", {"enum": ["red", "green", "blue"]}, ["red", "blue"], ["Red", "yellow", 1])
case("enum_int", {"enum": [1, 2, 3]}, [1, 3], [4, "1", 1.5])
case("enum_mixed", {"enum": ["a", 1, None, True]}, ["a", 1, None, True], ["b", 2, False])
case("enum_typed", {"type": "string", "enum": ["x", "y"]}, ["x"], ["z"])
case("const_str", {"const": "fixed"}, ["fixed"], ["other"])
case("const_in_object", _obj({"kind": {"const": "person"}, "name": S}), [{"kind": "person", "name": "A"}],
     [{"kind": "dog", "name": "A"}])
case("enum_in_object", _obj({"size": {"enum": ["S", "M", "L"]}, "qty": I}), [{"size": "M", "qty": 2}],
     [{"size": "XL", "qty": 2}, {"size": "S", "qty": "2"}])
case("enum_array_items", {"type": "array", "items": {"enum": ["up", "down"]}}, [["up", "down", "up"], []], [["left"]])
case("enum_long", {"enum": [f"option_{i}" for i in range(40)]}, ["option_0", "option_39"], ["option_40", "option_"])
case("enum_objects", {"enum": [{"a": 1}, [1, 2]]}, [{"a": 1}, [1, 2]], [{"a": 2}, [2, 1]])

# ---------------------------------------------------------------- nested objects
PERSON = _obj({"name": S, "age": I})
case("nested_1", _obj({"person": PERSON}), [{"person": {"name": "A", "age": 3}}], [{"person": {"name": "A"}}, {"person": 1}])
case("nested_2", _obj({"a": _obj({"b": _obj({"c": I})})}), [{"a": {"b": {"c": 1}}}], [{"a": {"b": {"c": "1"}}}, {"a": {}}])
case("nested_array_of_objects", _obj({"people": {"type": "array", "items": PERSON}}),
     [{"people": [{"name": "A", "age": 1}, {"name": "B", "age": 2}]}, {"people": []}], [{"people": [{"name": "A"}]}])
case("nested_address", _obj({"street": S, "city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
     [{"street": "Main", "city": "X", "zip": "12345"}], [{"street": "Main", "city": "X", "zip": "1234"}])
case("nested_company", _obj({"company": S, "address": _obj({"city": S}), "employees": {"type": "array", "items": PERSON, "maxItems": 2}}),
     [{"company": "C", "address": {"city": "Y"}, "employees": [{"name": "E", "age": 30}]}],
     [{"company": "C", "address": {"city": "Y"}, "employees": [PERSON_DOC := {"name": "E", "age": 30}] * 3}])
case("nested_matrix", {"type": "array", "items": {"type": "array", "items": I}}, [[[1, 2], [3]], [[]]], [[[1, "2"]], [1]])
case("nested_optional", _obj({"id": I, "meta": _obj({"tag": S})}, required=["id"]), [{"id": 1}, {"id": 1, "meta": {"tag": "t"}}],
     [{"meta": {"tag": "t"}}, {"id": 1, "meta": {"tag": 1}}])
case("nested_bool_null", _obj({"flag": B, "nothing": {"type": "null"}}), [{"flag": True, "nothing": None}], [{"flag": "true", "nothing": None}])
case("nested_deep_array", _obj({"grid": {"type": "array", "items": {"type": "array", "items": B, "maxItems": 2}, "maxItems": 2}}),
     [{"grid": [[True, False], [False]]}], [{"grid": [[True, True, True]]}])
case("nested_three_types", _obj({"s": S, "n": N, "i": I, "b": B}), [{"s": "", "n": 1.5, "i": -2, "b": False}],
     [{"s": "", "n": 1.5, "i": 2.5, "b": False}])

# ---------------------------------------------------------------- arrays with min/max items
for lo, hi in [(0, 1), (1, 1), (1, 3), (2, 4), (0, 5), (3, 3)]:
    case(f"array_{lo}_{hi}", {"type": "array", "items": I, "minItems": lo, "maxItems": hi},
         [list(range(lo)), list(range(hi))], [list(range(hi + 1))] + ([list(range(lo - 1))] if lo else [["x"]]))
case("array_min_only", {"type": "array", "items": S, "minItems": 2}, [["a", "b"], ["a", "b", "c"]], [["a"], []])
case("array_strings_bounded", {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3}, [["abc", "d"]],
     [["abcd"], ["a", "b", "c", "d"]])
case("array_of_numbers", {"type": "array", "items": N}, [[1, 2.5, -3e2], []], [[1, "2"], {"a": 1}])
case("array_prefix_items", {"type": "array", "prefixItems": [S, I], "items": False}, [["a", 1]], [[1, "a"], ["a", 1, 2]])
case("array_in_object", _obj({"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 2}}), [{"tags": ["x"]}],
     [{"tags": []}, {"tags": ["a", "b", "c"]}])
case("array_of_enums_bounded", {"type": "array", "items": {"enum": [1, 2]}, "minItems": 1, "maxItems": 2}, [[1], [2, 1]], [[], [3]])

# ---------------------------------------------------------------- anyOf / oneOf / allOf
case("anyof_scalar", {"anyOf": [S, I]}, ["a", 3], [1.5, None, True])
case("anyof_objects", {"anyOf": [_obj({"cat": S}), _obj({"dog": I})]}, [{"cat": "c"}, {"dog": 1}], [{"cat": 1}, {"bird": "b"}])
case("anyof_nullable", {"anyOf": [S, {"type": "null"}]}, ["x", None], [1])
case("anyof_in_object", _obj({"value": {"anyOf": [I, B]}}), [{"value": 1}, {"value": True}], [{"value": "1"}])
case("anyof_arrays", {"anyOf": [{"type": "array", "items": I, "maxItems": 1}, {"type": "array", "items": S, "maxItems": 1}]},
     [[1], ["a"], []], [[1, 2], [None]])
case("oneof_disjoint", {"oneOf": [S, I]}, ["a", 2], [None, 1.5])
case("oneof_objects", {"oneOf": [_obj({"a": I}), _obj({"b": S})]}, [{"a": 1}, {"b": "x"}], [{"a": "x"}, {"c": 1}])
case("allof_merge", {"allOf": [_obj({"a": I}, extra=None), _obj({"b": S}, extra=None)], "type": "object"}, [],
     [{"a": 1}, {"b": "x"}, {"a": "1", "b": "x"}])
case("allof_bounds", {"allOf": [{"type": "integer", "minimum": 0}, {"maximum": 10}]}, [0, 10, 5], [-1, 11, "5"])
case("allof_string", {"allOf": [{"type": "string"}, {"maxLength": 3}]}, ["abc", ""], ["abcd", 1])
case("type_list", {"type": ["string", "integer"]}, ["a", 1], [1.5, None])
case("type_list_nullable", _obj({"x": {"type": ["number", "null"]}}), [{"x": 1.5}, {"x": None}], [{"x": "1"}])

# ---------------------------------------------------------------- $ref, recursive ones included
NODE = {"$defs": {"node": {"type": "object", "properties": {"value": I, "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
                           "required": ["value", "next"], "additionalProperties": False}}, "$ref": "#/$defs/node"}
case("ref_linked_list", NODE, [{"value": 1, "next": None}, {"value": 1, "next": {"value": 2, "next": {"value": 3, "next": None}}}],
     [{"value": 1}, {"value": 1, "next": {"value": "2", "next": None}}])
TREE = {"$defs": {"tree": {"type": "object", "properties": {"name": S, "children": {"type": "array", "items": {"$ref": "#/$defs/tree"}}},
                           "required": ["name", "children"], "additionalProperties": False}}, "$ref": "#/$defs/tree"}
case("ref_tree", TREE, [{"name": "r", "children": [{"name": "a", "children": []}, {"name": "b", "children": [{"name": "c", "children": []}]}]}],
     [{"name": "r", "children": [{"name": 1, "children": []}]}, {"name": "r"}])
case("ref_simple", {"$defs": {"p": PERSON}, "$ref": "#/$defs/p"}, [{"name": "A", "age": 1}], [{"name": "A", "age": "1"}])
case("ref_definitions", {"definitions": {"id": {"type": "integer", "minimum": 1}}, **_obj({"id": {"$ref": "#/definitions/id"}})},
     [{"id": 1}], [{"id": 0}])
case("ref_shared_twice", {"$defs": {"pt": _obj({"x": I, "y": I})}, **_obj({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}})},
     [{"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 4}}], [{"a": {"x": 1}, "b": {"x": 3, "y": 4}}])
case("ref_array_items", {"$defs": {"t": {"enum": ["a", "b"]}}, "type": "array", "items": {"$ref": "#/$defs/t"}}, [["a", "b"]], [["c"]])
EXPR = {"$defs": {"e": {"anyOf": [I, {"type": "array", "items": {"$ref": "#/$defs/e"}, "maxItems": 3}]}}, "$ref": "#/$defs/e"}
case("ref_recursive_expr", EXPR, [1, [1, [2, [3]]], []], [[1, "x"], [1, 2, 3, 4]])
case("ref_json_pointer_nested", {"$defs": {"a": {"$defs": {"b": I}}}, "$ref": "#/$defs/a/$defs/b"}, [5], ["5"])
case("ref_in_anyof", {"$defs": {"s": S}, "anyOf": [{"$ref": "#/$defs/s"}, B]}, ["x", False], [1])
case("ref_pydantic_style", {"$defs": {"Pet": {"properties": {"name": {"title": "Name", "type": "string"}}, "required": ["name"],
                                              "title": "Pet", "type": "object"}},
                            "properties": {"pets": {"items": {"$ref": "#/$defs/Pet"}, "title": "Pets", "type": "array"}},
                            "required": ["pets"], "title": "Owner", "type": "object"},
     [{"pets": [{"name": "Rex"}]}], [{"pets": [{"nom": "Rex"}]}, {"pets": "Rex"}])

# ---------------------------------------------------------------- patterns
for name, pattern, good, bad in [
    ("pat_digits", "^[0-9]+$", ["123", "0"], ["12a", ""]),
    ("pat_phone", "^[0-9]{3}-[0-9]{4}$", ["555-1234"], ["5551234", "555-12345"]),
    ("pat_upper", "^[A-Z]{2,4}$", ["AB", "ABCD"], ["A", "ab", "ABCDE"]),
    ("pat_hex", "^#[0-9a-f]{6}$", ["#00ff00"], ["00ff00", "#00FF0G"]),
    ("pat_alt", "^(cat|dog)s?$", ["cat", "dogs"], ["cow", "cats!"]),
    ("pat_semver", "^[0-9]+\\.[0-9]+\\.[0-9]+$", ["1.2.3", "10.0.1"], ["1.2", "v1.2.3"]),
    ("pat_slug", "^[a-z]+(-[a-z]+)*$", ["a-b-c", "abc"], ["-a", "a--b", "A"]),
    ("pat_iso_code", "^[A-Z]{3}$", ["EUR"], ["EU", "eur"]),
]:
    case(name, {"type": "string", "pattern": pattern}, good, bad)
case("pat_in_object", _obj({"code": {"type": "string", "pattern": "^[A-Z][0-9]$"}, "n": I}), [{"code": "A1", "n": 1}],
     [{"code": "1A", "n": 1}])
case("pat_with_length", {"type": "string", "pattern": "^[a-z]*$", "maxLength": 3}, ["abc", ""], ["abcd", "AB"])

# ---------------------------------------------------------------- numeric bounds
for name, schema, good, bad in [
    ("num_int_range", {"type": "integer", "minimum": 1, "maximum": 5}, [1, 3, 5], [0, 6, 2.5]),
    ("num_int_negative", {"type": "integer", "minimum": -10, "maximum": -1}, [-10, -1], [0, -11]),
    ("num_int_min_only", {"type": "integer", "minimum": 100}, [100, 12345], [99, -100]),
    ("num_int_max_only", {"type": "integer", "maximum": 7}, [7, -3], [8, 70]),
    ("num_int_exclusive", {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}, [1, 9], [0, 10]),
    ("num_float_range", {"type": "number", "minimum": 0, "maximum": 1}, [0, 0.5, 1], [1.5, -0.1]),
    ("num_float_exclusive", {"type": "number", "exclusiveMinimum": 0}, [0.001, 3], [0, -1.5]),
    ("num_large_range", {"type": "integer", "minimum": 1000, "maximum": 99999}, [1000, 99999, 5432], [999, 100000]),
    ("num_zero_to_100", {"type": "integer", "minimum": 0, "maximum": 100}, [0, 42, 100], [101, -1]),
    ("num_plain_number", {"type": "number"}, [1, -2.5, 3e10], ["1", None]),
    ("num_plain_integer", {"type": "integer"}, [0, -7, 123456], [1.5, "7"]),
]:
    case(name, schema, good, bad)
case("num_in_object", _obj({"score": {"type": "number", "minimum": 0, "maximum": 10}, "count": {"type": "integer", "minimum": 1}}),
     [{"score": 9.5, "count": 1}], [{"score": 11, "count": 1}, {"score": 1, "count": 0}])

# ---------------------------------------------------------------- additionalProperties
case("addprops_false", _obj({"a": I}), [{"a": 1}], [{"a": 1, "b": 2}])
case("addprops_true", _obj({"a": I}, extra=True), [{"a": 1}, {"a": 1, "b": [1]}], [{"b": 1}, {"a": "x"}])
case("addprops_typed", _obj({"a": I}, extra=S), [{"a": 1}, {"a": 1, "b": "x"}], [{"a": 1, "b": 2}])
case("addprops_map", {"type": "object", "additionalProperties": I}, [{"x": 1, "y": 2}, {}], [{"x": "1"}, []])
case("addprops_map_of_objects", {"type": "object", "additionalProperties": _obj({"v": B})}, [{"k": {"v": True}}], [{"k": {"v": 1}}])
case("addprops_absent", {"type": "object", "properties": {"a": I}, "required": ["a"]}, [{"a": 1}, {"a": 1, "z": None}], [{"a": "1"}, {}])
case("addprops_empty_object", {"type": "object", "additionalProperties": False}, [{}], [{"a": 1}])
case("addprops_nested_false", _obj({"inner": _obj({"x": I})}), [{"inner": {"x": 1}}], [{"inner": {"x": 1, "y": 1}}])

# ---------------------------------------------------------------- required
case("required_none", _obj({"a": I, "b": S}, required=[]), [{}, {"a": 1}, {"b": "x"}, {"a": 1, "b": "x"}], [{"a": "1"}, {"c": 1}])
case("required_some", _obj({"a": I, "b": S, "c": B}, required=["b"]), [{"b": "x"}, {"a": 1, "b": "x", "c": True}], [{"a": 1}, {}])
case("required_all", _obj({"a": I, "b": S}), [{"a": 1, "b": "x"}], [{"a": 1}, {"b": "x"}])
case("required_last", _obj({"a": I, "b": I}, required=["b"]), [{"b": 2}, {"a": 1, "b": 2}], [{"a": 1}])
case("required_nested", _obj({"o": _obj({"x": I, "y": I}, required=["y"])}), [{"o": {"y": 1}}], [{"o": {"x": 1}}])
case("required_many", _obj({f"f{i}": I for i in range(8)}), [{f"f{i}": i for i in range(8)}], [{f"f{i}": i for i in range(7)}])
case("required_string_fields", _obj({"first": S, "last": S}), [{"first": "A", "last": "B"}], [{"first": "A", "last": None}])
case("required_with_enum", _obj({"status": {"enum": ["ok", "fail"]}, "code": I}, required=["status"]),
     [{"status": "ok"}, {"status": "fail", "code": 1}], [{"code": 1}])

# ---------------------------------------------------------------- strings, scalars, any JSON
case("str_min_max", {"type": "string", "minLength": 2, "maxLength": 4}, ["ab", "abcd"], ["a", "abcde"])
case("str_exact_length", {"type": "string", "minLength": 3, "maxLength": 3}, ["abc"], ["ab", "abcd"])
case("str_escapes", {"type": "string"}, ["quote \" and \\ backslash", "tab\tnewline\n", "caf\u00e9"], [1, None])
case("bool_only", B, [True, False], ["true", 0])
case("null_only", {"type": "null"}, [None], [0, "null"])
case("any_json", {}, [1, "x", None, [1, {"a": []}], {"k": {"n": 1.5}}], [])
case("json_object", {"type": "object"}, [{}, {"a": [1, 2], "b": {"c": None}}], [[1], "x", 3])
case("json_array_any", {"type": "array"}, [[], [1, "a", None, {"b": False}]], [{}, "[]"])
case("object_with_title_and_description", {"title": "Thing", "description": "A thing", **_obj({"label": {"type": "string", "description": "x"}})},
     [{"label": "L"}], [{"label": 5}])
case("object_empty_props_required_none", {"type": "object", "properties": {}, "additionalProperties": False}, [{}], [{"a": 1}])

# Keywords no backend can enforce exactly: the schema compiles relaxed (relax.py), naming the keyword.
UNSUPPORTED: list[tuple[str, Any, str]] = [
    ("unique_items", {"type": "array", "items": I, "uniqueItems": True}, "uniqueItems"),
    ("dependent_required", {"type": "object", "properties": {"a": I}, "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ("unknown_format", {"type": "string", "format": "credit-card"}, "format"),
    ("not_keyword", {"not": {"type": "string"}}, "not"),
]
