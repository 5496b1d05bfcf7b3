"""Decide the fan from a temperature reading (the route's event: topic, source, payload)."""

THRESHOLD_C = 25.0


def handler(event, context):
    reading = event.get("payload") or {}
    temp = float(reading.get("temp", 0.0))
    return {"fan": "on" if temp > THRESHOLD_C else "off", "last_temp": temp}
