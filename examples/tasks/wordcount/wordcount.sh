#!/bin/sh
# Counts the words of the event's "text" field with POSIX tools only.
input=$(cat)
text=$(printf '%s' "$input" | sed -n 's/.*"text"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')
words=$(printf '%s' "$text" | wc -w | tr -d ' ')
printf '{"words": %s}\n' "${words:-0}"
