"""The tool-use sample set's two tools, implemented for real: a calculator and a unit converter.

    python run_fine_tuning.py --task chat --tools sample --prompt "What is 12 * 7?"

``run_tool(name, arguments)`` returns the result text exactly as the sample data's ``tool`` turns
hold it (``{"result": 63}``, ``{"result": 13.12, "unit": "ft"}``), so a model trained on
``fine_tuning_llms/data/tool_use_conversations.jsonl`` sees at inference what it saw in training.
Bad input raises ``ToolError`` with a one-line message; the chat loop hands that message back to
the model as the tool's result (``{"error": ...}``), as an agent framework would.

The calculator never calls ``eval``: it parses the expression with ``ast.parse`` and walks the
tree, accepting only numbers, + - * /, unary + and -, and parentheses.
"""
from __future__ import annotations

import ast
import json
import operator

TOOL_SETS = ("none", "sample")
UNITS = ["km", "mi", "kg", "lb", "m", "ft", "L", "gal", "C", "F"]
SAMPLE_TOOLS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression with + - * /.",
        "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "description": "for example 12 * 7"}}, "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "convert_units", "description": "Convert a value between units of length, mass, volume or temperature.",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number"},
            "from_unit": {"type": "string", "enum": UNITS},
            "to_unit": {"type": "string", "enum": UNITS}},
            "required": ["value", "from_unit", "to_unit"]}}},
]
MAX_EXPRESSION = 200        # characters: a calculator question, not a program
MAX_MAGNITUDE = 1e15        # larger operands or results are refused (no giant integers)

# The unit factors, shared with scripts/make_tool_dataset.py, so results match the sample tool turns.
FACTORS = {("km", "mi"): 0.621371, ("mi", "km"): 1.609344, ("kg", "lb"): 2.204623, ("lb", "kg"): 0.453592,
           ("m", "ft"): 3.28084, ("ft", "m"): 0.3048, ("L", "gal"): 0.264172, ("gal", "L"): 3.785412}
# Other pairs of one dimension go through a base unit (metre, kilogram, litre).
TO_BASE = {"km": ("length", 1000.0), "m": ("length", 1.0), "mi": ("length", 1609.344), "ft": ("length", 0.3048),
           "kg": ("mass", 1.0), "lb": ("mass", 0.45359237), "L": ("volume", 1.0), "gal": ("volume", 3.785411784),
           "C": ("temperature", None), "F": ("temperature", None)}
ALIASES = {"kilometre": "km", "kilometer": "km", "mile": "mi", "kilogram": "kg", "pound": "lb", "lbs": "lb",
           "metre": "m", "meter": "m", "foot": "ft", "feet": "ft", "litre": "L", "liter": "L", "l": "L",
           "gallon": "gal", "celsius": "C", "°c": "C", "c": "C", "fahrenheit": "F", "°f": "F", "f": "F"}

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_SIGNS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class ToolError(ValueError):
    """A tool call the tool cannot carry out; the message is one line and says what was wrong."""


def tools_for(option: str | None) -> list[dict] | None:
    """The tool list a ``--tools`` value names: 'sample' gives the two sample tools; 'none' gives None."""
    if option in (None, "", "none"):
        return None
    if option == "sample":
        return [dict(t) for t in SAMPLE_TOOLS]
    raise ToolError(f"unknown tool set {option!r} (use one of: {', '.join(TOOL_SETS)})")


def _number(value: float) -> int | float:
    """Whole results as integers ({"result": 63}), others rounded to 6 decimals."""
    if isinstance(value, int) or float(value).is_integer():
        return int(value)
    return round(value, 6)


def _walk(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _SIGNS:
        value = _SIGNS[type(node.op)](_walk(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ToolError("division by zero")
        value = _OPERATORS[type(node.op)](left, right)
    else:
        raise ToolError(f"{ast.unparse(node)!r} is not allowed: use numbers, + - * /, and parentheses")
    if abs(value) > MAX_MAGNITUDE:
        raise ToolError(f"a number in the expression exceeds {MAX_MAGNITUDE:g}")
    return value


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression (numbers, + - * /, unary signs, parentheses)."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("expression must be a non-empty string such as \"12 * 7\"")
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"expression is longer than {MAX_EXPRESSION} characters")
    text = expression.strip().replace("×", "*").replace("÷", "/")
    try:
        tree = ast.parse(text, mode="eval")   # parsing only: nothing runs
    except SyntaxError:
        raise ToolError(f"{expression!r} is not an arithmetic expression") from None
    return _number(_walk(tree.body))


def canonical_unit(unit) -> str:
    if not isinstance(unit, str) or not unit.strip():
        raise ToolError(f"unit {unit!r} is not a unit name (use one of: {', '.join(UNITS)})")
    key = unit.strip()
    if key in TO_BASE:
        return key
    lowered = key.lower()
    found = ALIASES.get(lowered) or ALIASES.get(lowered.rstrip("s")) or next(
        (u for u in TO_BASE if u.lower() == lowered), None)
    if found is None:
        raise ToolError(f"unknown unit {unit!r} (use one of: {', '.join(UNITS)})")
    return found


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """``value`` in ``from_unit`` expressed in ``to_unit`` (canonical unit names), unrounded."""
    (dim_from, base_from), (dim_to, base_to) = TO_BASE[from_unit], TO_BASE[to_unit]
    if dim_from != dim_to:
        raise ToolError(f"cannot convert {from_unit} ({dim_from}) to {to_unit} ({dim_to})")
    if from_unit == to_unit:
        return float(value)
    if (from_unit, to_unit) == ("C", "F"):
        return value * 9 / 5 + 32
    if (from_unit, to_unit) == ("F", "C"):
        return (value - 32) * 5 / 9
    if (from_unit, to_unit) in FACTORS:
        return value * FACTORS[from_unit, to_unit]
    return value * base_from / base_to


def convert_units(value, from_unit, to_unit) -> dict:
    """{"result": value rounded to 2 decimals, "unit": to_unit}, as in the sample data."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ToolError(f"value {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) > MAX_MAGNITUDE:
        raise ToolError(f"value {value!r} is not a number within ±{MAX_MAGNITUDE:g}")
    src, dst = canonical_unit(from_unit), canonical_unit(to_unit)
    return {"result": float(round(convert(value, src, dst), 2)), "unit": dst}


def _arguments(arguments, name: str, required: tuple[str, ...]) -> dict:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise ToolError(f"{name} arguments are not JSON") from None
    if not isinstance(arguments, dict):
        raise ToolError(f"{name} arguments are {type(arguments).__name__}, not a JSON object")
    missing = [k for k in required if k not in arguments]
    extra = sorted(set(arguments) - set(required))
    if missing or extra:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(extra)}"] if extra else [])
        raise ToolError(f"{name} arguments: {'; '.join(problems)} (expects {', '.join(required)})")
    return arguments


def run_tool(name: str, arguments) -> str:
    """Run one sample tool; the result as the JSON text a ``tool`` turn holds. Raises ToolError."""
    if name == "calculator":
        args = _arguments(arguments, name, ("expression",))
        result = {"result": calculate(args["expression"])}
    elif name == "convert_units":
        args = _arguments(arguments, name, ("value", "from_unit", "to_unit"))
        result = convert_units(args["value"], args["from_unit"], args["to_unit"])
    else:
        raise ToolError(f"unknown tool {name!r} (the sample tools: calculator, convert_units)")
    return json.dumps(result, ensure_ascii=False)
