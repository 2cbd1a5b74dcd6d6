#include "utf8.h"

namespace fastcodegen {

namespace {

const char kReplacement[] = "\xEF\xBF\xBD";  // U+FFFD

// For a lead byte: how many continuation bytes follow, and the range the
// first of them must fall in (which excludes overlong forms and surrogates).
bool lead(unsigned char c, int& need, unsigned char& lo, unsigned char& hi) {
  lo = 0x80;
  hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    need = 1;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 2;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 3;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return false;
  }
  return true;
}

}  // namespace

void Utf8Decoder::decode(const char* bytes, size_t n, std::string& out, bool final) {
  std::string buf;
  const char* p = bytes;
  if (!pending_.empty()) {
    buf = pending_;
    buf.append(bytes, n);
    pending_.clear();
    p = buf.data();
    n = buf.size();
  }
  size_t i = 0;
  while (i < n) {
    const unsigned char c = static_cast<unsigned char>(p[i]);
    if (c < 0x80) {  // a run of ASCII, appended at once (most of code is ASCII)
      size_t j = i + 1;
      while (j < n && static_cast<unsigned char>(p[j]) < 0x80) ++j;
      out.append(p + i, j - i);
      i = j;
      continue;
    }
    int need;
    unsigned char lo, hi;
    if (!lead(c, need, lo, hi)) {
      out.append(kReplacement);
      ++i;
      continue;
    }
    size_t j = i + 1;
    bool bad = false;
    for (int k = 0; k < need; ++k, ++j) {
      if (j >= n) {  // the character goes on in bytes not seen yet
        if (final) {
          out.append(kReplacement);
        } else {
          pending_.assign(p + i, n - i);
        }
        return;
      }
      const unsigned char d = static_cast<unsigned char>(p[j]);
      if (d < (k == 0 ? lo : 0x80) || d > (k == 0 ? hi : 0xBF)) {
        if (!final && c == 0xED && k == 0 && d >= 0xA0 && d <= 0xBF && j + 1 >= n) {
          // Python holds the first two bytes of a surrogate back too (for its
          // surrogatepass handler); they become U+FFFDs when the next chunk comes.
          pending_.assign(p + i, n - i);
          return;
        }
        bad = true;
        break;
      }
    }
    if (bad) {
      out.append(kReplacement);  // the maximal valid prefix becomes one U+FFFD;
      i = j;                     // the offending byte starts over
    } else {
      out.append(p + i, j - i);
      i = j;
    }
  }
}

size_t utf8_floor(const std::string& s, size_t n) {
  if (n >= s.size()) return s.size();
  while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  return n;
}

}  // namespace fastcodegen
