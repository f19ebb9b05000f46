"""What `localserve bench --grammar-budget` asks for: JSON schemas of the kinds agents send (each
with the prompt it goes with) and tools for forced calls. Unlike the strict schemas of
`bench --grammar`, most leave strings, numbers and objects unbounded: the outputs must close
within max_tokens all the same. Every schema's shortest document, and the shortest call of each
tool case, fits in 31 tokens of the default model, so that an answer that parses exists at the
smallest budget measured (32)."""

from __future__ import annotations

_STR = {"type": "string"}
_STRS = {"type": "array", "items": _STR}


def _obj(props: dict, required: list[str] | None = None, strict: bool = True) -> dict:
    out = {"type": "object", "properties": props, "required": list(props) if required is None else required}
    if strict:
        out["additionalProperties"] = False
    return out


# name -> (prompt, schema)
SCHEMAS: dict[str, tuple[str, dict]] = {
    "country_facts": ("Describe Thailand as JSON with every fact you know.", _obj({
        "country": _STR, "population": {"type": "integer"}, "area_km2": {"type": "number"}, "capital": _STR,
        "languages": _STRS})),
    "weather_report": ("Report today's weather in Lisbon as JSON.", _obj({
        "city": _STR, "temperature_c": {"type": "number"}, "conditions": {"enum": ["sunny", "cloudy", "rain", "snow"]},
        "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
        "wind": _obj({"speed_kmh": {"type": "number"}, "direction": {"enum": ["N", "E", "S", "W"]}})},
        required=["city", "temperature_c", "conditions", "humidity"])),
    "todo_list": ("Write my todo list for moving house as JSON.", _obj({
        "title": _STR, "items": {"type": "array", "items": _obj({
            "task": _STR, "done": {"type": "boolean"}, "priority": {"enum": ["low", "medium", "high"]}})}})),
    "person": ("Make up a person and give their details as JSON.", _obj({
        "name": _STR, "age": {"type": "integer", "minimum": 0}, "email": _STR, "phone": _STR},
        required=["name", "age", "email"])),
    "address": ("Give the address of a bakery in Berlin as JSON.", _obj({
        "street": _STR, "city": _STR, "postal_code": {"type": "string", "pattern": "^[0-9]{5}$"},
        "country": {"type": "string", "maxLength": 56}})),
    "product": ("List a product from a hardware store as JSON.", _obj({
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "name": _STR,
        "price": {"type": "number", "minimum": 0}, "in_stock": {"type": "boolean"},
        "tags": {"type": "array", "items": _STR, "maxItems": 5}}, required=["sku", "name", "price", "in_stock"])),
    "order": ("Write an online order for three books as JSON.", _obj({
        "order_id": {"type": "integer"}, "customer": _obj({"name": _STR, "email": _STR}),
        "lines": {"type": "array", "minItems": 1, "items": _obj({
            "sku": _STR, "qty": {"type": "integer", "minimum": 1}, "unit_price": {"type": "number"}})},
        "total": {"type": "number"}}, required=["order_id", "lines"])),
    "calendar_event": ("Schedule a team meeting next Tuesday as JSON.", _obj({
        "title": _STR, "start": _STR, "duration_minutes": {"type": "integer", "minimum": 1, "maximum": 1440},
        "attendees": _STRS, "location": _STR}, required=["title", "start", "duration_minutes", "attendees"])),
    "code_edit": ("Fix the off-by-one error in utils.py's range loop; answer as a JSON edit.", _obj({
        "path": _STR, "old_string": _STR, "new_string": _STR, "replace_all": {"type": "boolean"}},
        required=["path", "old_string", "new_string"])),
    "shell_command": ("Which command lists the ten largest files here? Answer as JSON.", _obj({
        "command": _STR, "cwd": _STR, "timeout_s": {"type": "integer"}}, required=["command", "timeout_s"])),
    "classification": ("Classify this issue: 'the app crashes when I click save'. Answer as JSON.", _obj({
        "label": {"enum": ["bug", "feature", "question", "docs"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "reasons": {"type": "array", "items": _STR, "maxItems": 3}})),
    "sentiment": ("Rate the sentiment of 'I love this phone but the battery is awful' as JSON.", _obj({
        "sentiment": {"enum": ["positive", "negative", "mixed", "neutral"]},
        "score": {"type": "number", "minimum": -1, "maximum": 1}})),
    "entities": ("Extract the entities of 'Ada Lovelace met Babbage in London in 1833' as JSON.", _obj({
        "entities": {"type": "array", "items": _obj({
            "text": _STR, "type": {"enum": ["PERSON", "ORG", "PLACE", "DATE"]}, "start": {"type": "integer"}})}})),
    "plan": ("Plan the steps to deploy a web app as JSON.", _obj({
        "goal": _STR, "steps": {"type": "array", "items": _obj({
            "id": {"type": "integer"}, "action": _STR, "depends_on": {"type": "array", "items": {"type": "integer"}}})}})),
    "recipe": ("Give a pancake recipe as JSON.", _obj({
        "name": _STR, "servings": {"type": "integer", "minimum": 1},
        "ingredients": {"type": "array", "items": _obj({
            "item": _STR, "amount": {"type": "number"}, "unit": {"enum": ["g", "ml", "pcs", "tbsp"]}})},
        "steps": _STRS})),
    "bug_report": ("File a bug report about a login page that hangs, as JSON.", _obj({
        "title": {"type": "string", "maxLength": 80}, "severity": {"enum": ["low", "medium", "high", "critical"]},
        "steps_to_reproduce": _STRS, "expected": _STR, "actual": _STR, "environment": {"type": "object"}},
        required=["title", "severity", "steps_to_reproduce", "environment"])),
    "api_request": ("Write the HTTP request that creates a user in a REST API, as JSON.", _obj({
        "method": {"enum": ["GET", "POST", "PUT", "DELETE"]}, "url": _STR,
        "headers": {"type": "object", "additionalProperties": _STR}, "body": {"type": "object"}})),
    "geo_point": ("Where is the Eiffel Tower? Answer as JSON.", _obj({
        "lat": {"type": "number", "minimum": -90, "maximum": 90},
        "lon": {"type": "number", "minimum": -180, "maximum": 180}, "label": _STR}, required=["lat", "lon"])),
    "movie": ("Describe a classic science fiction film as JSON.", _obj({
        "title": _STR, "year": {"type": "integer", "minimum": 1888, "maximum": 2100},
        "rating": {"type": "number", "minimum": 0, "maximum": 10},
        "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "sci-fi", "action", "horror"]}}})),
    "git_commit": ("Write the commit for a fix of a null pointer in the parser, as JSON.", _obj({
        "type": {"enum": ["feat", "fix", "docs", "chore"]}, "scope": {"type": "string", "maxLength": 20},
        "subject": {"type": "string", "maxLength": 72}, "body": _STR, "breaking": {"type": "boolean"}},
        required=["type", "subject", "breaking"])),
    "search_results": ("Give search results for 'rust async runtime' as JSON.", _obj({
        "query": _STR, "total": {"type": "integer"},
        "results": {"type": "array", "items": _obj({"title": _STR, "url": _STR, "snippet": _STR})}})),
    "free_object": ("Tell me everything about Jupiter as a JSON object.", {"type": "object"}),
    "tree": ("Show the folder structure of a Python project as a JSON tree.", {
        "$defs": {"node": _obj({"name": _STR, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}})},
        "$ref": "#/$defs/node"}),
    "payment": ("Pay for an order by card or bank transfer; answer as JSON.", _obj({"method": {"anyOf": [
        _obj({"kind": {"const": "card"}, "number": {"type": "string", "pattern": "^[0-9]{16}$"}, "expiry": _STR}),
        _obj({"kind": {"const": "bank"}, "iban": _STR})]}, "amount": {"type": "number", "minimum": 0}})),
}

TOOLS: list[dict] = [
    {"type": "function", "function": {"name": "web_search", "description": "Search the web", "parameters": _obj({
        "query": _STR, "max_results": {"type": "integer"}, "site": _STR}, required=["query", "max_results"],
        strict=False)}},
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now in a city", "parameters": _obj({
        "city": _STR, "unit": {"enum": ["celsius", "fahrenheit"]}}, required=["city"], strict=False)}},
    {"type": "function", "function": {"name": "create_event", "description": "Add a calendar event", "parameters": _obj({
        "title": _STR, "start": _STR, "attendees": _STRS, "duration_minutes": {"type": "integer"}}, strict=False)}},
    {"type": "function", "function": {"name": "run_shell", "description": "Run a shell command", "parameters": _obj({
        "command": _STR, "timeout_s": {"type": "integer"}}, required=["command"], strict=False)}},
    {"type": "function", "function": {"name": "edit_file", "description": "Replace text in a file", "parameters": _obj({
        "path": _STR, "old_string": _STR, "new_string": _STR}, strict=False)}},
]

# name -> (prompt, tool_choice, parallel_tool_calls)
TOOL_CASES: dict[str, tuple[str, object, bool]] = {
    "required": ("Find the latest news about the Mekong river and the weather in Hanoi.", "required", True),
    "required_single": ("Book a two-hour planning meeting with Ana and Raj on Friday at 10.", "required", False),
    "named": ("Show me the ten largest files under /var/log.",
              {"type": "function", "function": {"name": "run_shell"}}, True),
}
