"""The main job as resumable stages: dense eval -> refactor -> train -> evaluate -> serve -> report."""
