"""Example task: greets the caller. The module is loaded once per environment; warm calls
only run ``handler``."""

import os
import time

_LOADED_AT = time.time()  # module-level work happens once, at environment start


def handler(event, context):
    name = (event or {}).get("name", "world")
    print(f"greeting {name}")  # captured into the call's logs
    return {
        "message": f"{os.environ.get('GREETING', 'Hello')}, {name}!",
        "warm_for_s": round(time.time() - _LOADED_AT, 3),
    }
