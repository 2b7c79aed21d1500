// UTF-8 validation: what JSON text and Protobuf string fields hold. Readers of foreign files
// (pickles, safetensors headers) refuse other bytes where a name is expected, as Python and the
// reference safetensors reader do, so that every name memento writes back parses again.
#pragma once

#include <string_view>

namespace memento {

// Well-formed UTF-8 (RFC 3629): no overlong forms, no surrogates (U+D800..U+DFFF), nothing past
// U+10FFFF.
bool IsUtf8(std::string_view s);

}  // namespace memento
