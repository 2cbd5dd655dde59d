# Turns the nvcc fatbin into a C++ source holding it as a byte array, so the extension
# carries its kernels and loads them through the driver API (cuModuleLoadData) at run time.
file(READ "${INPUT}" hex HEX)
string(LENGTH "${hex}" hex_len)
math(EXPR size "${hex_len} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
file(WRITE "${OUTPUT}"
  "#include <cstddef>\n"
  "namespace fst::kernels {\n"
  "alignas(64) extern const unsigned char kFatbin[] = {${bytes}};\n"
  "extern const std::size_t kFatbinSize = ${size};\n"
  "}\n")
