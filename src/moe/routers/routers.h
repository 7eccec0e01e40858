// One factory per routing method; registry.cpp maps each RouterKind to its factory.
#pragma once

#include <memory>

#include "moe/router.h"

namespace moe::routing {

std::unique_ptr<Router> make_topk(const MoeConfig& cfg);           // topk.cpp (and switch)
std::unique_ptr<Router> make_noisy_topk(const MoeConfig& cfg);     // noisy_topk.cpp
std::unique_ptr<Router> make_gshard(const MoeConfig& cfg);         // gshard.cpp
std::unique_ptr<Router> make_expert_choice(const MoeConfig& cfg);  // expert_choice.cpp
std::unique_ptr<Router> make_soft(const MoeConfig& cfg);           // soft.cpp
std::unique_ptr<Router> make_hierarchical(const MoeConfig& cfg);   // hierarchical.cpp
std::unique_ptr<Router> make_deepseek(const MoeConfig& cfg);       // deepseek.cpp

}  // namespace moe::routing
