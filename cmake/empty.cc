// Empty: libmemento.so is made of the client, core and proto archives linked whole.
