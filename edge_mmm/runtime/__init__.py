"""Live runtime: camera + microphone -> VAD -> streaming ASR -> turn manager -> streamed answer."""
