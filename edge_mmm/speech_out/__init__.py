"""Spoken answers: sentence splitting, text-to-speech engines, playback sinks, the speaker, the echo gate."""
