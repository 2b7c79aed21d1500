// Native checkpoint reader and writer: being implemented (see native_checkpoint.h).
