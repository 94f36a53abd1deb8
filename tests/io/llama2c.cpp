#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>
