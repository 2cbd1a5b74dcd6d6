// Incremental UTF-8 decoding of byte-level BPE tokens, as Python's
// codecs.getincrementaldecoder("utf-8")(errors="replace") does it: valid
// sequences pass through, each maximal invalid subpart becomes U+FFFD, and
// the bytes of a character still incomplete at the end are held back until
// the next call (or, with final, replaced). Output stays UTF-8.
#pragma once

#include <string>

namespace fastcodegen {

class Utf8Decoder {
 public:
  // Appends the decoded text of `bytes` (after any held-back bytes) to `out`.
  void decode(const char* bytes, size_t n, std::string& out, bool final = false);
  void flush(std::string& out) { decode(nullptr, 0, out, true); }
  bool pending() const { return !pending_.empty(); }

 private:
  std::string pending_;  // an incomplete, so far valid, sequence (at most 3 bytes)
};

// The largest length <= n at which a UTF-8 string does not split a character.
size_t utf8_floor(const std::string& s, size_t n);

}  // namespace fastcodegen
