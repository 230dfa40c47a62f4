"""Dev tooling, outside the shipped plugin: ComfyUI provisioning and servers, ComfyUI FLUX builders,
tiny model fixtures. Used by the tests, the benchmarks and the laboratory."""
