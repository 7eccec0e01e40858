# Embeds a file into the binary: writes OUTPUT, a C++ source defining
#   moe::embedded::NAME[] (its bytes, as unsigned char) and moe::embedded::NAME_size.
# Run as a build step: cmake -DINPUT=file -DOUTPUT=file.cpp -DNAME=identifier -P embed.cmake
foreach(var INPUT OUTPUT NAME)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "embed.cmake: -D${var}=... is required")
  endif()
endforeach()
file(READ "${INPUT}" hex HEX)
string(LENGTH "${hex}" hex_len)
math(EXPR size "${hex_len} / 2")
# Every byte as 0xNN, sixteen to a line.
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
string(REGEX REPLACE "((0x[0-9a-f][0-9a-f],){16})" "\\1\n  " bytes "${bytes}")
get_filename_component(input_name "${INPUT}" NAME)
set(text "// Generated from ${input_name} by cmake/embed.cmake: do not edit.
#include <cstddef>

namespace moe::embedded {
extern const unsigned char ${NAME}[];
extern const size_t ${NAME}_size;
const unsigned char ${NAME}[] = {
  ${bytes}0x00};
const size_t ${NAME}_size = ${size};
}  // namespace moe::embedded
")
file(WRITE "${OUTPUT}" "${text}")
