"""Runs Helm's own Go code on the chart, in the Python >= 3.12 virtualenv that .ci/run makes
(/opt/helmvenv: helm-sdkpy for `helm lint`, helm-python-sdk for offline rendering and
values.schema.json validation). tests/test_helm_chart.py calls it in a subprocess: one JSON request
on stdin, one JSON answer on stdout.

  {"op": "sdk_lint", "chart": PATH}                          helm-sdkpy's Lint (the chart's defaults)
  {"op": "lint", "chart": PATH, "values": {...}}             helm lint --strict with these values
  {"op": "render", "chart": PATH, "values": {...}, "name": R, "namespace": N}
                                                             helm template: {template path: text}
  {"op": "validate", "chart": PATH, "values": {...}}         values.schema.json only

An answer is {"ok": true, "result": ...} or {"ok": false, "error": TYPE, "message": TEXT}.
"""

import asyncio
import json
import sys


def main() -> None:
    request = json.load(sys.stdin)
    op, chart = request["op"], request["chart"]
    values = request.get("values") or None
    try:
        if op == "sdk_lint":
            import helm_sdkpy
            result = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(chart))
            # Go errors marshal to {}: keep the severities and paths, which are what is checked.
            result = {"messages": [{"severity": m["Severity"], "path": m["Path"]} for m in result.get("Messages") or []],
                      "errors": result.get("Errors")}
        else:
            import helm_python
            if op == "lint":
                result = helm_python.lint(chart, values, strict=True)
            else:
                with helm_python.Chart.load(chart) as loaded:
                    if op == "validate":
                        loaded.validate_schema(values)
                        result = None
                    elif op == "render":
                        result = loaded.render(values, name=request.get("name", "rel"),
                                               namespace=request.get("namespace", "default"), is_install=True)
                    else:
                        raise ValueError(f"unknown op {op!r}")
    except Exception as exc:  # noqa: BLE001 - the caller asserts on the type and the message
        json.dump({"ok": False, "error": type(exc).__name__, "message": str(exc)}, sys.stdout)
        return
    json.dump({"ok": True, "result": result}, sys.stdout)


if __name__ == "__main__":
    main()
