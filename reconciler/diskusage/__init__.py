"""Sandbox disk usage as `du -s` counts it, measured in the background for the disk/du isolator.

walk      one tree's usage now: our own walk (`measure`) or GNU du's (`du_measure`)
mounts    the mount points below a sandbox, left out of its usage
watch     a tree's usage kept current by inotify between measurements (`TreeUsage`)
schedule  which sandbox is measured when, one at a time (`DiskUsageCollector`)
process   the child process the collector runs in, and the agent's end of it (`MeasuringClient`)

Nothing here knows containers beyond an id to name a sandbox by; limits and status are the isolator's.
"""
